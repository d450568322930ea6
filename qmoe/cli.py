"""The `qmoe` command: run, serve, info, calibrate, train-predictors, eval-predictors.

Each command is a `cmd_*` function over its parsed arguments (build_parser). Errors a
user can cause print as one line `error: ...` (exit 1), never a traceback, and every
argument is checked before anything is printed or computed.
"""

from __future__ import annotations

import argparse
import codecs
import random
import resource
import sys
from collections import Counter

from qmoe.chat import render_chat
from qmoe.errors import QmoeError
from qmoe.experts.options import AUTO, LOOKAHEAD, MISS_POLICIES, OFF, POLICIES, PREDICT_IN, OffloadOptions

RAM_BUDGET_HELP = ("RAM pool of quantized expert slabs, filled by explicit reads from the file. auto (the "
                   "default): a pool read with O_DIRECT, sized to the memory available, only when the experts "
                   "do not fit it (qmoe says so in one line); off: no pool, the mapped file")


def _peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's VmHWM, the high-water mark of this program's own memory: getrusage's
    ru_maxrss also keeps the peak of whatever process forked us before exec (a
    500 MB test runner, say), so it can report the parent's memory instead of ours.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


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


def _offload_options(args: argparse.Namespace):
    """OffloadOptions from `run`'s flags, or None when no tier is asked for (the plain runtime)."""
    from qmoe.experts.link import SimulatedLink

    off = args.ram_budget is not None and args.ram_budget.strip().lower() == OFF
    if (args.ram_budget is None or off) and args.gpu_budget is None and args.sim_fast_budget is None:
        given = [flag for flag, value in (
            ("--prefetch", args.prefetch != "none"), ("--on-miss", args.on_miss), ("--k-prime", args.k_prime),
            ("--lookahead", args.lookahead is not None),
            ("--predict-in", args.predict_in != OffloadOptions.predict_in), ("--predictors", args.predictors),
            ("--always-prefetch", args.always_prefetch),
            ("--sim-link-gbps", args.sim_link_gbps),
            ("--sim-link-latency-us", args.sim_link_latency_us), ("--no-page-cache", args.no_page_cache),
            ("--io-depth", args.io_depth != OffloadOptions.io_depth), ("--stats", args.stats), ("--stats-json", args.stats_json),
        ) if value]
        if given:
            raise QmoeError(f"{', '.join(given)} only apply with an expert store: give --ram-budget (auto or a "
                            "size) and/or --gpu-budget")
        return None if off else OffloadOptions()  # the default: --ram-budget auto
    if args.sim_link_latency_us is not None and args.sim_link_gbps is None:
        raise QmoeError("--sim-link-latency-us needs --sim-link-gbps")
    link = SimulatedLink(args.sim_link_gbps, args.sim_link_latency_us or 0.0) if args.sim_link_gbps else None
    return OffloadOptions(ram_budget=args.ram_budget or AUTO, gpu_budget=args.gpu_budget,
                          sim_fast_budget=args.sim_fast_budget, prefetch=args.prefetch,
                          on_miss=args.on_miss or "cpu", k_prime=args.k_prime, lookahead=args.lookahead,
                          predict_in=args.predict_in, govern=not args.always_prefetch,
                          predictors=args.predictors, direct_io=args.no_page_cache, io_depth=args.io_depth, link=link)


def _prepare_oracle(model, args, sampling) -> None:
    """--prefetch oracle: run the generation once to record its routing, which the real run then replays."""
    if args.chat:
        raise QmoeError("--prefetch oracle replays a recorded run, which a chat cannot have; use it with -p")
    if args.prompt is None:
        raise QmoeError("give a prompt with -p PROMPT")
    print("qmoe: oracle: recording the routing of a first run to replay", file=sys.stderr)
    trace = model.record_routing(model.tokenize(args.prompt), args.n_predict, sampling)
    model.replay_routing(trace)


def _report_offload(model, args) -> None:
    from qmoe.experts.stats import format_table, write_json

    summary = model.offload_stats()
    if summary is None:
        return
    if args.stats:
        print(format_table(summary), file=sys.stderr)
    if args.stats_json:
        write_json(summary, args.stats_json)


def cmd_run(args: argparse.Namespace) -> int:
    from qmoe.engine import SamplingParams, load

    if args.n_predict < 0:
        raise QmoeError(f"-n/--n-predict must be >= 0, got {args.n_predict}")
    if args.prompt is None and not args.chat:
        raise QmoeError("give a prompt with -p PROMPT (or use --chat)")
    offload = _offload_options(args)
    seed = args.seed
    if offload is not None and offload.prefetch == "oracle" and seed is None and args.temp > 0:
        seed = random.randrange(2**31)  # the recording and the replay must sample the same tokens
    sampling = SamplingParams(args.temp, args.top_k, args.top_p, seed, args.repeat_penalty, args.repeat_last_n)
    model = load(args.model, device=args.device, n_ctx=args.ctx, threads=args.threads, offload=offload,
                 exact_products=args.exact_products)
    print(f"qmoe: {model.path.name}: {model.file.arch}, {model.net.hp.n_layer} layers, "
          f"{model.net.hp.n_expert} experts ({model.net.hp.n_expert_used} used), ctx {model.n_ctx}, "
          f"device {model.device}", file=sys.stderr)
    with model:
        return _generate(model, offload, args, sampling)


def _generate(model, offload, args: argparse.Namespace, sampling) -> int:
    """cmd_run's generation and report, on a loaded model."""
    status = 0
    try:
        if offload is not None and offload.prefetch == "oracle":
            _prepare_oracle(model, args, sampling)
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
            ids = model.tokenize(args.prompt)
            model.check_fits(len(ids), args.n_predict)  # before the prompt is echoed
            sys.stdout.write(args.prompt)
            _stream_text(model, ids, args, sampling)
    except KeyboardInterrupt:  # Ctrl-C ends the generation, not the report
        sys.stdout.write("\n")
        status = 130  # as a shell reports a SIGINT
    except EOFError:  # the end of a --chat session's input
        sys.stdout.write("\n")
    print(model.timings.summary(), file=sys.stderr)
    print(f"qmoe: peak RSS     = {_peak_rss_mib():9.1f} MiB", file=sys.stderr)
    ram = model.store.describe().get("ram") if model.store is not None else None
    if ram is not None:  # the part of the RSS the budget bounds; the rest is a fixed overhead
        print(f"qmoe: RAM pool     = {ram['bytes'] / 2**20:9.1f} MiB ({ram['slots']} expert slabs)",
              file=sys.stderr)
    _report_offload(model, args)
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    from qmoe.engine import SamplingParams, load

    try:
        from qmoe.serve.app import ServeOptions, serve
        from qmoe.serve.protocol import Defaults
    except ImportError as e:
        raise QmoeError(f"qmoe serve needs the serve extra (missing: {e.name}): pip install -e \".[serve]\"") from None
    offload = _offload_options(args)
    if offload is not None and offload.prefetch == "oracle":
        raise QmoeError("--prefetch oracle replays a recorded run, which a server cannot have")
    if args.parallel < 1:
        raise QmoeError(f"--parallel must be >= 1, got {args.parallel}")
    if args.queue < 0:
        raise QmoeError(f"--queue must be >= 0, got {args.queue}")
    if args.n_predict < 1:
        raise QmoeError(f"-n must be >= 1 (the default max_tokens), got {args.n_predict}")
    sampling = SamplingParams(args.temp, args.top_k, args.top_p, args.seed, args.repeat_penalty, args.repeat_last_n)
    options = ServeOptions(host=args.host, port=args.port, parallel=args.parallel, queue=args.queue,
                           api_key=args.api_key, shutdown_grace=args.shutdown_grace)
    model = load(args.model, device=args.device, n_ctx=args.ctx, threads=args.threads, offload=offload,
                 exact_products=args.exact_products)
    try:
        serve(model, Defaults(args.n_predict, sampling), options)
    finally:
        _report_offload(model, args)
        model.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gguf import GGMLQuantizationType

    from qmoe.gguf_file import STRING_ERRORS, GGUFFile

    def shown(value) -> str:
        """`value` for the terminal: bytes of a string that were not UTF-8 in the file (lone
        surrogates, see gguf_file.STRING_ERRORS) become \\xNN instead of failing the print."""
        return str(value).encode("utf-8", STRING_ERRORS).decode("utf-8", "backslashreplace")

    f = GGUFFile(args.model)
    print(f"file:          {shown(f.path)}")
    print(f"architecture:  {shown(f.arch)}")
    print(f"name:          {shown(f.get('general.name', '-'))}")
    for key in ("block_count", "embedding_length", "context_length", "attention.head_count",
                "attention.head_count_kv", "expert_count", "expert_used_count", "expert_feed_forward_length",
                "expert_shared_count", "leading_dense_block_count"):
        value = f.arch_get(key, None)
        if value is not None:
            print(f"{key + ':':<28}{shown(value)}")
    print(f"tokenizer:     {shown(f.get('tokenizer.ggml.model', '-'))} "
          f"({len(f.get('tokenizer.ggml.tokens', []))} tokens)")
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qmoe.engine import load
    from qmoe.predictor.calibrate import record, self_generated_text, tokenize_files

    if not args.text and not args.self_generate:
        raise QmoeError("give calibration text with --text FILE... or --self-generate N")
    offload = None if args.ram_budget.strip().lower() == OFF else OffloadOptions(ram_budget=args.ram_budget)
    with load(args.model, device=args.device, threads=args.threads, offload=offload) as model:
        docs = tokenize_files(model, args.text) if args.text else []
        if args.self_generate:
            docs += self_generated_text(model, args.self_generate, seed=args.seed)
        meta = record(model, docs, args.output, args.tokens, window=args.window)
    print(f"recorded {meta.n_tokens} tokens x {len(meta.moe_layers)} MoE layers into {args.output}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from qmoe import kernels
    from qmoe.engine import DEFAULT_BATCH, DEFAULT_CTX
    from qmoe.experts.budget import choose_ram_budget, mem_available
    from qmoe.experts.options import parse_budget
    from qmoe.experts.plan import forecast, format_table, model_shape, probe, report, routing
    from qmoe.gguf_file import GGUFFile

    if args.threads:
        kernels.set_num_threads(args.threads)
    file = GGUFFile(args.model)
    n_ctx = args.ctx or min(DEFAULT_CTX, int(file.arch_get("context_length", DEFAULT_CTX)))
    shape = model_shape(file, n_ctx, DEFAULT_BATCH)
    if args.ram:
        budgets = [None if spec.strip().lower() == OFF else
                   parse_budget(spec, shape.sizes.expert_bytes, "--ram") for spec in args.ram]
    else:  # what `--ram-budget auto` would choose here, beside the mapped file
        auto = choose_ram_budget(shape.sizes, mem_available())
        print(f"qmoe: --ram-budget auto here: {auto.message}", file=sys.stderr)
        budgets = [None] if auto.budget is None else [None, auto.budget]
    route = routing(file, shape, args.predictors)
    measured = probe(file, shape)
    forecasts = [forecast(shape, measured, b, route) for b in budgets]
    print(format_table(shape, measured, route, forecasts))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report(shape, measured, route, forecasts), out, indent=1)
    return 0


def cmd_train_predictors(args: argparse.Namespace) -> int:
    from qmoe.gguf_file import GGUFFile
    from qmoe.predictor.calib_data import CalibData
    from qmoe.predictor.model import INPUT_PRE_ATTN, INPUT_PREV_ROUTER
    from qmoe.predictor.sidecar import (
        check_output_path,
        default_embedded_path,
        default_sidecar_path,
        model_identity,
        write_embedded,
        write_sidecar,
    )
    from qmoe.predictor.train import train_all

    calib = CalibData(args.data)
    if calib.meta.model_identity != model_identity(GGUFFile(args.model)):
        raise QmoeError(f"{args.data} was recorded from another model than {args.model}")
    options = dict(hidden=args.hidden, arch=args.arch, k_prime=args.k_prime, epochs=args.epochs, lr=args.lr,
                   batch=args.batch, device=args.device, patience=args.patience, seed=args.seed)
    out = args.output or (default_embedded_path if args.embed else default_sidecar_path)(args.model)
    # Before training, which may take long. A sidecar is replaced as before (retraining renews
    # it); an embedded file is a whole model, replaced only with --force.
    check_output_path(out, [args.model], overwrite=args.force or not args.embed)
    predictors, _ = train_all(calib, input=INPUT_PRE_ATTN, **options)
    if args.embed:
        write_embedded(args.model, predictors, out, weight_type=args.type, overwrite=args.force)
        print(f"wrote {args.model} with {len(predictors.layers)} predictors (hidden {predictors.hidden}) "
              f"embedded to {out} (qmoe only: llama.cpp refuses the extra tensors)")
    else:
        write_sidecar(out, predictors, weight_type=args.type)
        print(f"wrote {len(predictors.layers)} predictors (hidden {predictors.hidden}) to {out}")
    if args.cross_layer_output:
        baseline, _ = train_all(calib, input=INPUT_PREV_ROUTER, **options)
        write_sidecar(args.cross_layer_output, baseline, weight_type=args.type)
        print(f"wrote the cross-layer-trained baseline to {args.cross_layer_output}")
    return 0


def cmd_eval_predictors(args: argparse.Namespace) -> int:
    from qmoe.gguf_file import GGUFFile
    from qmoe.models.base import to_numpy
    from qmoe.predictor.calib_data import CalibData
    from qmoe.predictor.evaluate import evaluate, format_table, plot_exact_match, write_json
    from qmoe.predictor.sidecar import load_sidecar, model_identity, predictor_source

    f = GGUFFile(args.model)
    identity = model_identity(f)
    predictors = load_sidecar(predictor_source(f, args.predictors), identity)
    cross = load_sidecar(args.cross_layer, identity) if args.cross_layer else None
    calib = CalibData(args.data)
    routers = {i: to_numpy(f.tensor(f"blk.{i}.ffn_gate_inp.weight")) for i in calib.moe_layers}
    result = evaluate(calib, predictors, routers, cross_layer_predictors=cross, k_prime=args.k_prime)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot_exact_match(result, args.plot)
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and where it runs: what `run` and `serve` share."""
    parser.add_argument("model", help="path to the .gguf model")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(4096, trained))")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (attention and dense layers; default cpu)")
    parser.add_argument("--exact-products", action="store_true",
                        help="CPU products on float32 activations (default: 8-bit activations and integer "
                             "products, as llama.cpp; faster)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How tokens are drawn (for `serve`: the defaults of requests that do not say)."""
    parser.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    parser.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens; 0 = all (default 40)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    parser.add_argument("--repeat-penalty", type=float, default=1.0,
                        help="divide the (positive) logits of recently seen tokens by this; 1 = off (default 1)")
    parser.add_argument("--repeat-last-n", type=int, default=64,
                        help="how many recent tokens, prompt included, the repeat penalty looks at (default 64)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """The expert store's budgets, prefetch policy and statistics (read by _offload_options)."""
    off = parser.add_argument_group(
        "expert offloading", "Keep the routed experts within memory budgets and prefetch them ahead of use. "
        "SIZE is bytes with an optional K/M/G/T suffix (binary: 6G = 6 GiB) or a share of all experts "
        "in that tier's form, e.g. 40%.")
    off.add_argument("--ram-budget", metavar="SIZE", help=RAM_BUDGET_HELP)
    off.add_argument("--gpu-budget", metavar="SIZE",
                     help="GPU memory for a compute-ready fast tier of dequantized experts (--device cuda)")
    off.add_argument("--sim-fast-budget", metavar="SIZE",
                     help="SIMULATE a fast tier without a GPU: quantized slabs in CPU memory behind "
                          "--sim-link-gbps (to measure what prediction buys behind a slower link)")
    off.add_argument("--prefetch", choices=POLICIES, default="none",
                     help="none: on-demand loads and an LRU cache; cross-layer: layer l's router on layer l-1's "
                          "router input; pre-attn: the trained predictors on attn_norm; oracle: the true "
                          "routing, replayed from a first run (an upper bound). Default none")
    off.add_argument("--on-miss", choices=MISS_POLICIES, default=None,
                     help="a fast-tier miss: cpu computes it from the quantized slab with the CPU kernels, "
                          "wait loads it (default cpu)")
    off.add_argument("--k-prime", type=int, default=None,
                     help="candidate experts a prediction names per token (default: twice the predictors' k', "
                          "else twice ceil(1.5 k)); only the ranks right more often than wrong are read")
    off.add_argument("--lookahead", type=int, default=None, metavar="N",
                     help="pre-attn and oracle: predict each MoE layer's experts N MoE layers ahead, right "
                          "after an earlier attention, from the residual stream, so that their reads overlap "
                          "the blocks between; 0 = the paper's schedule, each layer at its own pre-attention "
                          f"(default {LOOKAHEAD})")
    off.add_argument("--predict-in", choices=PREDICT_IN, default=OffloadOptions.predict_in,
                     help="where predictions run: model (the model's thread, before attention), worker (a "
                          "thread beside attention); auto: worker with --device cuda, else model, where a "
                          "prediction costs less than a handoff (default auto)")
    off.add_argument("--always-prefetch", action="store_true",
                     help="pre-attn and cross-layer: prefetch in every forward pass; by default qmoe "
                          "measures as it runs whether prefetching makes the run faster (timing the halves of "
                          "passes in which one half of the layers prefetches) and keeps it only while it does")
    off.add_argument("--predictors", default=None, metavar="PATH", help="predictor GGUF for pre-attn (default: embedded in MODEL, else MODEL.pred.gguf)")
    off.add_argument("--sim-link-gbps", type=float, default=None, metavar="GB_S",
                     help="SIMULATE a link of this many gigabytes/s for transfers into the compute tier")
    off.add_argument("--sim-link-latency-us", type=float, default=None, metavar="US",
                     help="per-transfer latency of the simulated link in microseconds (default 0)")
    off.add_argument("--no-page-cache", action="store_true",
                     help="read experts with O_DIRECT so the page cache holds no second copy")
    off.add_argument("--io-depth", type=int, default=OffloadOptions.io_depth, metavar="N",
                     help="expert reads from the file in flight at once: a drive serves several in little "
                          f"more than the time of one (default {OffloadOptions.io_depth})")
    off.add_argument("--stats", action="store_true", help="print expert store statistics to stderr")
    off.add_argument("--stats-json", default=None, metavar="FILE", help="write expert store statistics as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmoe", description="Quantized runtime for Mixture-of-Experts LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a GGUF model",
                         description="Generate text from a GGUF MoE model, streaming tokens as they come.")
    run.add_argument("-p", "--prompt", help="prompt text (with --chat: the first user message)")
    add_model_arguments(run)
    add_sampling_arguments(run)
    run.add_argument("--chat", action="store_true", help="chat with the model's chat template (reads stdin)")
    add_offload_arguments(run)
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the serve extra)",
        description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), "
        "with /health and /metrics. The sampling flags are the defaults of requests that leave them out; "
        "-n is the default max_tokens.")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="requests generated at once, each in its own KV cache slot; their decode steps run "
                            "together (default 1)")
    serve.add_argument("--queue", type=int, default=64, metavar="N",
                       help="requests that may wait for a slot; past them the server answers 503 (default 64)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    serve.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                       help="on SIGTERM, seconds in-flight requests get to finish before they are ended (default 10)")
    add_sampling_arguments(serve)
    add_offload_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="describe a GGUF model", description="Print a GGUF model's architecture, "
                          "sizes, bytes per tensor type, and whether predictors are present.")
    info.add_argument("model", help="path to the .gguf model")
    info.set_defaults(func=cmd_info)

    plan = sub.add_parser("plan", help="forecast what fits and how fast it runs at each RAM budget",
                          description="Forecast decode tok/s, time to first token and peak RSS at each RAM "
                          "budget, from the model's shapes, the routing calibration counted (the predictors' "
                          "route counts; uniform without them) and a probe of this machine of at most about 14 "
                          "seconds (drive bandwidth with O_DIRECT, kernel speed). Nothing is loaded.")
    plan.add_argument("model", help="path to the .gguf model")
    plan.add_argument("--ram", nargs="+", metavar="SIZE",
                      help="RAM budgets to forecast (sizes, shares of the experts, or off = the mapped file; "
                           "default: the mapped file and what --ram-budget auto would choose)")
    plan.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(4096, trained))")
    plan.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    plan.add_argument("--predictors", default=None, metavar="FILE",
                      help="predictors whose route counts give the routing's concentration (default: embedded "
                           "in the model, else the sidecar model.pred.gguf beside it, else uniform routing)")
    plan.add_argument("--json", default=None, metavar="FILE", help="also write the forecast as JSON")
    plan.set_defaults(func=cmd_plan)

    cal = sub.add_parser("calibrate", help="record router decisions for predictor training",
                         description="Run the model over text and record, per MoE layer and token, the "
                         "pre-attention activation, the router input, the router logits and its top-k.")
    cal.add_argument("model", help="path to the .gguf model")
    cal.add_argument("--text", nargs="+", metavar="FILE", help="calibration text files (UTF-8)")
    cal.add_argument("--self-generate", type=int, metavar="N", default=0,
                     help="also sample N tokens from the model itself as calibration text")
    cal.add_argument("--tokens", type=int, default=200_000, help="tokens to record at most (default 200000)")
    cal.add_argument("--window", type=int, default=256, help="tokens per context window (default 256)")
    cal.add_argument("-o", "--output", required=True, metavar="CALIB_DIR", help="output directory (new or empty)")
    cal.add_argument("--device", default="cpu", help="cpu or cuda")
    cal.add_argument("--ram-budget", metavar="SIZE", default=AUTO, help=RAM_BUDGET_HELP)
    cal.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    cal.add_argument("--seed", type=int, default=0, help="seed for --self-generate")
    cal.set_defaults(func=cmd_calibrate)

    tr = sub.add_parser("train-predictors", help="train the pre-attention expert predictors",
                        description="Train one predictor per MoE layer on a calibration recording and write "
                        "them to a sidecar GGUF (model.pred.gguf beside the model by default), or with --embed "
                        "to a copy of the model that holds them (qmoe only: llama.cpp does not load it).")
    tr.add_argument("model", help="path to the .gguf model the recording came from")
    tr.add_argument("--data", required=True, metavar="CALIB_DIR", help="output of `qmoe calibrate`")
    tr.add_argument("-o", "--output", default=None,
                    help="output path (default: MODEL.pred.gguf, with --embed MODEL.pred-embedded.gguf)")
    tr.add_argument("--embed", action="store_true",
                    help="write one GGUF with the model and its predictors instead of a sidecar; qmoe loads it, "
                         "llama.cpp refuses it (tensors its architecture does not know)")
    tr.add_argument("--force", action="store_true", help="with --embed: overwrite an existing output file")
    tr.add_argument("--hidden", type=int, default=None, help="predictor width (default min(1024, n_embd))")
    tr.add_argument("--arch", type=int, choices=(1, 2), default=1,
                    help="1: Linear-BatchNorm-GELU-Dropout-Linear (default); 2: Linear-SiLU-Linear")
    tr.add_argument("--epochs", type=int, default=30, help="maximum epochs (default 30)")
    tr.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default 3)")
    tr.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    tr.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    tr.add_argument("--k-prime", type=int, default=None, help="suggested over-provisioning (default ceil(1.5k))")
    tr.add_argument("--type", choices=("f16", "q8_0"), default="f16", help="weight type of the predictors")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--cross-layer-output", default=None, metavar="PATH",
                    help="also train the cross-layer-trained baseline and write it here")
    tr.set_defaults(func=cmd_train_predictors)

    ev = sub.add_parser("eval-predictors", help="compare the predictors with the baselines",
                        description="Exact match, over-provisioned exact match, top-1 and recall@k on held-out "
                        "tokens, per layer, for pre-attn and the baselines.")
    ev.add_argument("model", help="path to the .gguf model")
    ev.add_argument("--data", required=True, metavar="CALIB_DIR", help="output of `qmoe calibrate`")
    ev.add_argument("--predictors", default=None, metavar="PATH",
                    help="predictor GGUF (default: those embedded in MODEL, else MODEL.pred.gguf)")
    ev.add_argument("--cross-layer", default=None, metavar="PATH", help="cross-layer-trained baseline sidecar")
    ev.add_argument("--k-prime", type=int, default=None, help="over-provisioning for the over-provisioned metric")
    ev.add_argument("--json", default=None, metavar="OUT", help="write the full result as JSON")
    ev.add_argument("--plot", default=None, metavar="PNG", help="plot exact match by layer")
    ev.set_defaults(func=cmd_eval_predictors)
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
