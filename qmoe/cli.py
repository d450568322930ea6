"""The `qmoe` command: run, info.

Errors a user can cause print as one line `error: ...` (exit 1), never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import resource
import sys
from collections import Counter

from qmoe.errors import QmoeError


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def render_chat(model, messages: list[dict]) -> str:
    """The model's chat template applied to `messages`, ending with the assistant's turn."""
    template = model.tokenizer.chat_template
    if not template:
        raise QmoeError(f"{model.path}: the model has no chat template (tokenizer.chat_template); run without --chat")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise QmoeError("--chat needs the jinja2 package to render the model's chat template: pip install jinja2") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tok = model.tokenizer
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True,
        bos_token=tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
        eos_token=tok.decode([tok.eos_id]) if tok.eos_id is not None else "",
    )


def _stream_text(model, ids: list[int], args, sampling) -> str:
    """Generate after `ids`, printing UTF-8 text as soon as it is complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for token in model.stream(ids, args.n_predict, sampling):
        text = decoder.decode(model.tokenizer.decode_token(token))
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    tail = decoder.decode(b"", final=True)
    sys.stdout.write(tail + "\n")
    return "".join(pieces) + tail


def cmd_run(args: argparse.Namespace) -> int:
    from qmoe.engine import SamplingParams, load

    sampling = SamplingParams(args.temp, args.top_k, args.top_p, args.seed)
    model = load(args.model, device=args.device, n_ctx=args.ctx, threads=args.threads)
    print(f"qmoe: {model.path.name}: {model.file.arch}, {model.net.hp.n_layer} layers, "
          f"{model.net.hp.n_expert} experts ({model.net.hp.n_expert_used} used), ctx {model.n_ctx}, "
          f"device {model.device}", file=sys.stderr)
    try:
        if args.chat:
            messages = []
            first = args.prompt
            while True:
                user = first if first is not None else input("> ")
                first = None
                messages.append({"role": "user", "content": user})
                ids = model.tokenize(render_chat(model, messages), add_bos=False)
                reply = _stream_text(model, ids, args, sampling)
                messages.append({"role": "assistant", "content": reply})
        else:
            if args.prompt is None:
                raise QmoeError("give a prompt with -p PROMPT (or use --chat)")
            sys.stdout.write(args.prompt)
            _stream_text(model, model.tokenize(args.prompt), args, sampling)
    except (KeyboardInterrupt, EOFError):
        sys.stdout.write("\n")
    print(model.timings.summary(), file=sys.stderr)
    print(f"qmoe: peak RSS     = {_peak_rss_mib():9.1f} MiB", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gguf import GGMLQuantizationType

    from qmoe.gguf_file import GGUFFile

    f = GGUFFile(args.model)
    print(f"file:          {f.path}")
    print(f"architecture:  {f.arch}")
    print(f"name:          {f.get('general.name', '-')}")
    for key in ("block_count", "embedding_length", "context_length", "attention.head_count",
                "attention.head_count_kv", "expert_count", "expert_used_count", "expert_feed_forward_length",
                "expert_shared_count", "leading_dense_block_count"):
        value = f.arch_get(key, None)
        if value is not None:
            print(f"{key + ':':<28}{value}")
    print(f"tokenizer:     {f.get('tokenizer.ggml.model', '-')} ({len(f.get('tokenizer.ggml.tokens', []))} tokens)")
    by_type: Counter = Counter()
    expert_bytes = 0
    for t in f.tensors.values():
        by_type[GGMLQuantizationType(t.qtype).name] += t.nbytes
        if "_exps." in t.name:
            expert_bytes += t.nbytes
    total = sum(by_type.values())
    print(f"tensors:       {len(f.tensors)}, {total / 2**20:.1f} MiB ({expert_bytes / 2**20:.1f} MiB in routed experts)")
    for name, nbytes in by_type.most_common():
        print(f"  {name:<6} {nbytes / 2**20:10.1f} MiB")
    sidecar = f.path.with_name(f.path.name.removesuffix(".gguf") + ".pred.gguf")
    embedded = any(name.startswith("blk.") and ".pred_" in name for name in f.tensors)
    if embedded:
        print("predictors:    embedded in the model file")
    elif sidecar.exists():
        print(f"predictors:    {sidecar.name} (sidecar)")
    else:
        print("predictors:    none (train them with `qmoe train-predictors`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmoe", description="Quantized runtime for Mixture-of-Experts LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a GGUF model",
                         description="Generate text from a GGUF MoE model, streaming tokens as they come.")
    run.add_argument("model", help="path to the .gguf model")
    run.add_argument("-p", "--prompt", help="prompt text (with --chat: the first user message)")
    run.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    run.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    run.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens; 0 = all (default 40)")
    run.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    run.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    run.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(4096, trained))")
    run.add_argument("--device", default="cpu", help="cpu or cuda (attention and dense layers; default cpu)")
    run.add_argument("--chat", action="store_true", help="chat with the model's chat template (reads stdin)")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="describe a GGUF model", description="Print a GGUF model's architecture, "
                          "sizes, bytes per tensor type, and whether predictors are present.")
    info.add_argument("model", help="path to the .gguf model")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
