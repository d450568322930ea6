"""Pre-attention expert predictors (paper.md): data, network, training, evaluation, storage.

calib_data.py  the on-disk calibration recording (per MoE layer: activations, router scores, top-k)
model.py       the predictor network, its exported weights, the per-token forward
train.py       training one predictor per MoE layer (and the cross-layer-trained baseline)
metrics.py     exact match, over-provisioned exact match, top-1, recall@k
evaluate.py    every method and baseline on held-out tokens; table, JSON, plot
sidecar.py     the predictor GGUF beside the model, and the base model's identity
"""
