"""Train the small Qwen3-MoE model that qmoe ships as its quick-start model.

Why it exists: predictor accuracy, expert-cache hit rates and generated text mean
nothing on random weights, and nothing may be downloaded. So we train a real (if
small) mixture-of-experts language model on text every machine with Python has:
the Python standard library's own source files.

What it does, top to bottom:
1. Corpus. Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, found
   recursively, sorted by relative path, skipping the directories named in
   ``EXCLUDED_DIRS`` (tests, third-party packages, generated tables and data
   blobs). The split is by file: every 20th file of that sorted list
   (positions 19, 39, ...) is validation, the rest is training. The exact text
   depends on the Python version that runs this script; the log records the
   version, the file lists and a SHA-256 of the corpus.
2. Tokenizer. A SentencePiece BPE model trained on the training files only,
   with identity normalization (NFKC would rewrite code), whitespace kept as
   written, byte fallback (any text is encodable), digits split, and
   whitespace-only pieces allowed so indentation runs become single tokens.
   The trainer sees chunks of whole lines *including* their newlines, so pieces
   such as ``"):\\n"`` exist. No user-defined symbols: SentencePiece matches
   those before BPE while transformers' LlamaTokenizer merges them as ordinary
   BPE pieces, and the two would then tokenize indentation differently.
3. Model. transformers' Qwen3MoeForCausalLM built from a Qwen3MoeConfig
   (``MODEL_CONFIG``): every layer a sparse MoE block with top-k routing,
   renormalized top-k weights and a load-balancing loss applied to each layer
   separately, so every layer keeps all its experts in use (later work trains
   expert predictors on this routing).
4. Training. AdamW, linear warmup then cosine decay, bf16 autocast on CPU,
   fixed-length windows of the concatenated training files in a seeded order.
   Training and periodic validation loss go to a tqdm bar and the log.
5. Result. Validation perplexity beside that of a unigram model fitted on the
   training tokens (add-one smoothing), per-layer expert usage, and a greedy
   continuation of ``"def main("``; the checkpoint is saved in the Hugging Face
   layout in bf16.

Reproduce the committed model (the defaults are the committed run; about 35 minutes
on one core of a 2-core machine; the log's first line is the command that wrote it):
    python bench/train_tiny_moe.py --steps 2400 --out models/tiny-qwen3moe --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "tiny-qwen3moe"
DEFAULT_STEPS = 2400
SEED = 1234

# Directories (at any depth) whose files are not part of the corpus: test suites and
# their data (lib2to3 carries Python 2 test inputs), installed third-party packages,
# the IDLE application, demos, a frozen-module sample (__phello__), generated codec
# tables (encodings/) and the pydoc topic blob, which are data rather than code.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "encodings",
        "pydoc_data",
        "lib2to3",
        "turtledemo",
        "__phello__",
        "__pycache__",
    }
)
VALIDATION_EVERY = 20  # every 20th file of the sorted list is held out

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 6144
# The SentencePiece trainer takes "sentences"; we give it runs of whole lines of
# about this many characters so that newlines end up inside pieces.
TOKENIZER_CHUNK_CHARS = 2000

# Every matrix row length (256 for hidden, 128 for expert down_proj) is a multiple of 32
# so q4_0/q8_0 blocks apply.
MODEL_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,  # unused: every layer is an MoE layer (decoder_sparse_step=1)
    "moe_intermediate_size": 128,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.05,  # applied per layer, see load_balancing_loss
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}

SEQ_LEN = 512
BATCH_SIZE = 4
PEAK_LR = 2e-3
FINAL_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
EVAL_WINDOWS = 16  # validation windows used for the periodic (not the final) validation loss
EVAL_TIMES = 10  # periodic validations per run
LOG_EVERY = 25
PROMPT = "def main("


def stdlib_corpus_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its corpus files, sorted by path relative to the root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
        and not path.relative_to(root).parts[0].startswith("config-")  # build helper, not stdlib code
    ]
    return root, sorted(files, key=lambda path: path.relative_to(root).as_posix())


def split_by_file(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Training and validation files: every VALIDATION_EVERY-th file is validation."""
    train = [path for i, path in enumerate(files) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    validation = [path for i, path in enumerate(files) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    return train, validation


def corpus_sha256(root: Path, files: list[Path]) -> str:
    """A hash of the file names and bytes, to tell whether another Python saw the same text."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_text(path: Path) -> str:
    # A few stdlib files are Latin-1 with a coding cookie; replacement keeps them usable.
    return path.read_bytes().decode("utf-8", errors="replace")


def line_chunks(texts: list[str]):
    """Runs of whole lines (newlines kept) of about TOKENIZER_CHUNK_CHARS characters."""
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > TOKENIZER_CHUNK_CHARS:
                yield chunk
                chunk = ""
            chunk += line
        if chunk:
            yield chunk


def train_tokenizer(train_texts: list[str]) -> bytes:
    """A serialized SentencePiece BPE model trained on the training text only."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=line_chunks(train_texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9999,
        max_sentence_length=4 * TOKENIZER_CHUNK_CHARS,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,  # single-threaded for a deterministic model
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def encode_files(tokenizer: spm.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    """One token stream [N]: each file as <s> tokens </s>, files in corpus order."""
    ids: list[int] = []
    for text in texts:
        ids.append(BOS_ID)
        ids.extend(tokenizer.encode(text))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, validation_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # [V]
    log_probs = counts.log() - counts.sum().log()
    return math.exp(-log_probs[validation_ids].mean().item())


def windows(stream: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of the stream, starting at offset."""
    count = (len(stream) - offset) // seq_len
    return stream[offset : offset + count * seq_len].view(count, seq_len)


def training_batches(stream: torch.Tensor, generator: torch.Generator):
    """Endless [BATCH_SIZE, SEQ_LEN] batches; each epoch a fresh seeded offset and order."""
    while True:
        offset = int(torch.randint(SEQ_LEN, (1,), generator=generator))
        epoch = windows(stream, SEQ_LEN, offset)
        order = torch.randperm(len(epoch), generator=generator)
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            yield epoch[order[start : start + BATCH_SIZE]]


def learning_rate(step: int, total_steps: int) -> float:
    """Linear warmup to PEAK_LR, then cosine decay to FINAL_LR_FRACTION of it."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return PEAK_LR * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def build_model() -> Qwen3MoeForCausalLM:
    """The seeded, untrained model, set up for CPU training."""
    torch.manual_seed(SEED)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL_CONFIG))
    # grouped_mm runs all experts in one kernel, several times faster on CPU than the
    # per-expert loop; it is a runtime choice and is not saved in config.json.
    model.set_experts_implementation("grouped_mm")
    return model.train()


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style balance loss, computed per layer and averaged over layers.

    transformers' own aux loss pools the routing of all layers before measuring
    balance, so each layer may collapse onto a few experts as long as the layers
    pick different ones; in short runs they do. Per layer it is, for each layer,
    E * sum_e (tokens routed to e / T) * (mean router probability of e), which is
    top_k when routing is uniform.
    """
    losses = []
    for logits in router_logits:  # [T, E]
        probs = logits.float().softmax(dim=-1)  # [T, E]
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # [T, k]
        routed_share = torch.nn.functional.one_hot(chosen, num_experts).sum(dim=1).float().mean(dim=0)  # [E]
        losses.append(num_experts * (routed_share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def forward(model: Qwen3MoeForCausalLM, batch: torch.Tensor):
    """Next-token cross-entropy of a batch [B, S], and the per-layer router logits [B*S, E]."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(input_ids=batch)
    logits = output.logits[:, :-1].float()  # [B, S-1, V]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    return loss, output.router_logits


@torch.no_grad()
def validation_loss(model: Qwen3MoeForCausalLM, batches: torch.Tensor) -> float:
    """Mean next-token cross-entropy over validation windows [W, SEQ_LEN]."""
    model.eval()
    losses = [
        forward(model, batches[i : i + BATCH_SIZE])[0].item() for i in range(0, len(batches), BATCH_SIZE)
    ]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def final_validation(model: Qwen3MoeForCausalLM, batches: torch.Tensor) -> tuple[float, list[list[float]]]:
    """Mean validation cross-entropy, and per layer the share of top-k routing slots each expert gets."""
    model.eval()
    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_experts)  # [L, E]
    losses = []
    for i in range(0, len(batches), BATCH_SIZE):
        loss, router_logits = forward(model, batches[i : i + BATCH_SIZE])
        losses.append(loss.item())
        for layer, logits in enumerate(router_logits):  # logits: [T, E]
            chosen = logits.float().topk(config.num_experts_per_tok, dim=-1).indices  # [T, k]
            counts[layer] += torch.bincount(chosen.flatten(), minlength=config.num_experts)
    model.train()
    return sum(losses) / len(losses), (counts / counts.sum(dim=1, keepdim=True)).tolist()


@torch.no_grad()
def greedy_continuation(model: Qwen3MoeForCausalLM, tokenizer: spm.SentencePieceProcessor) -> str:
    model.eval()
    prompt = torch.tensor([[BOS_ID] + tokenizer.encode(PROMPT)])
    generated = model.generate(prompt, max_new_tokens=64, do_sample=False)
    model.train()
    return tokenizer.decode(generated[0, 1:].tolist())


TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "model_max_length": MODEL_CONFIG["max_position_embeddings"],
}


def save_checkpoint(model: Qwen3MoeForCausalLM, tokenizer_model: bytes, out: Path) -> None:
    """Hugging Face layout in bf16: config, weights, generation config, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    model.float()
    # transformers 5 writes num_local_experts and rope_parameters; released Qwen3-MoE
    # checkpoints (and converters written for them) use num_experts and rope_theta.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (HF layout)")
    # One thread by default: on a 2-core machine shared with any other busy process, two
    # threads wait on each other at every small op (measured 5-8 s/step against 0.8 s/step
    # with one thread); on an idle machine two threads are only ~25% faster.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    log_lines: list[str] = []

    def log(line: str) -> None:
        tqdm.write(line)
        log_lines.append(line)

    out = args.out.resolve()
    shown_out = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
    command = (
        f"python bench/train_tiny_moe.py --steps {args.steps} --out {shown_out} --threads {args.threads}"
    )
    log(f"command: {command}")
    log(f"python {platform.python_version()}, torch {torch.__version__}, seed {SEED}")

    root, files = stdlib_corpus_files()
    train_files, validation_files = split_by_file(files)
    corpus_hash = corpus_sha256(root, files)
    train_texts = [read_text(path) for path in train_files]
    validation_texts = [read_text(path) for path in validation_files]
    log(
        f"corpus: {len(files)} files under {root} ({sum(map(len, train_texts + validation_texts))} chars), "
        f"sha256 {corpus_hash}; {len(train_files)} train / {len(validation_files)} validation files"
    )

    tokenizer_model = train_tokenizer(train_texts)
    tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_ids = encode_files(tokenizer, train_texts)
    validation_ids = encode_files(tokenizer, validation_texts)
    unigram_ppl = unigram_perplexity(train_ids, validation_ids, VOCAB_SIZE)
    log(
        f"tokens: {len(train_ids)} train, {len(validation_ids)} validation; "
        f"unigram validation perplexity {unigram_ppl:.2f}"
    )

    model = build_model()
    parameter_count = sum(p.numel() for p in model.parameters())
    log(
        f"model: {parameter_count} parameters ({2 * parameter_count / 1e6:.1f} MB in bf16); "
        f"{SEQ_LEN} tokens x {BATCH_SIZE} per step, {args.steps} steps = "
        f"{args.steps * SEQ_LEN * BATCH_SIZE / len(train_ids):.2f} epochs"
    )

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY
    )
    validation_windows = windows(validation_ids, SEQ_LEN)
    batches = training_batches(train_ids, torch.Generator().manual_seed(SEED))
    eval_every = max(1, args.steps // EVAL_TIMES)
    history: list[dict] = []
    train_started = time.time()
    progress = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        loss, router_logits = forward(model, next(batches))
        balance = load_balancing_loss(router_logits, model.config.num_experts_per_tok)
        (loss + model.config.router_aux_loss_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": loss.item(),
            "balance_loss": balance.item(),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if (step + 1) % eval_every == 0 and step + 1 < args.steps:
            record["val_loss"] = validation_loss(model, validation_windows[:EVAL_WINDOWS])
        if "val_loss" in record or (step + 1) % LOG_EVERY == 0:
            history.append(record)
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
    seconds_per_step = (time.time() - train_started) / max(1, args.steps)

    final_loss, usage = final_validation(model, validation_windows)
    continuation = greedy_continuation(model, tokenizer)
    log(
        f"validation: loss {final_loss:.4f}, perplexity {math.exp(final_loss):.2f} "
        f"(unigram baseline {unigram_ppl:.2f}) on {len(validation_windows)} windows of {SEQ_LEN}"
    )
    for layer, shares in enumerate(usage):
        log(
            f"layer {layer} expert share: min {min(shares):.3f} max {max(shares):.3f} "
            f"(uniform {1 / len(shares):.3f})"
        )
    log(f"greedy continuation of {PROMPT!r}:\n{continuation}")

    save_checkpoint(model, tokenizer_model, args.out)
    total_seconds = time.time() - started
    log(f"time: {seconds_per_step:.2f} s/step, {total_seconds / 60:.1f} min in all")
    summary = {
        "command": command,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch_version": torch.__version__,
        "seed": SEED,
        "corpus": {
            "stdlib_root": str(root),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "validation_every": VALIDATION_EVERY,
            "sha256": corpus_hash,
            "train_files": [path.relative_to(root).as_posix() for path in train_files],
            "validation_files": [path.relative_to(root).as_posix() for path in validation_files],
            "train_tokens": len(train_ids),
            "validation_tokens": len(validation_ids),
        },
        "model_config": MODEL_CONFIG,
        "parameters": parameter_count,
        "training": {
            "steps": args.steps,
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "peak_lr": PEAK_LR,
            "final_lr_fraction": FINAL_LR_FRACTION,
            "warmup_fraction": WARMUP_FRACTION,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "threads": args.threads,
            "seconds_per_step": seconds_per_step,
            "total_seconds": total_seconds,
        },
        "history": history,
        "validation_loss": final_loss,
        "validation_perplexity": math.exp(final_loss),
        "unigram_validation_perplexity": unigram_ppl,
        "expert_usage": usage,
        "greedy_continuation": {"prompt": PROMPT, "text": continuation},
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "train_log.txt").write_text("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
