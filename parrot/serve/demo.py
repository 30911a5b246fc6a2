"""Launch the Parrot chat demo (Gradio) on the local machine.

    python -m parrot.serve.demo                          # the quickstart model if trained, else a fresh tiny one
    python -m parrot.serve.demo --model runs/quickstart/stage2 --port 7860
    python -m parrot.serve.demo --host 0.0.0.0 --share   # reachable from other machines / a public link (opt-in)

Analytics are off; the server listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from ..fileio import positive_int

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype choices (torch dtype names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .engine import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m parrot.serve.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"saved Parrot model directory (default: {DEFAULT_MODEL_DIR} if it exists, "
                             "else an untrained tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    parser.add_argument("--concurrency", type=positive_int, default=2, help="generations running at once; others queue")
    parser.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting at most; more are refused")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None,
                        help="where the model runs, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="model dtype (default auto: bfloat16 on a GPU, the saved dtype on the CPU)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        parser.error("--concurrency and --max-queue must be >= 1")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.dtype == "auto":
        args.dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes, one line per request
    import torch

    from .engine import ChatEngine, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, processor, source = load_model(args.model, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"parrot.serve.demo: cannot load --model: {err}") from err
    engine = ChatEngine(model, processor, source=source)
    from .app import PAGE_CSS, build_app  # Gradio: imported once the model has loaded (a bad --model fails fast)
    from .examples import write_examples
    from .uploads import MAX_UPLOAD_BYTES
    with tempfile.TemporaryDirectory(prefix="parrot-demo-examples-") as examples_dir:
        examples = write_examples(examples_dir)
        demo = build_app(engine, examples, concurrency_limit=args.concurrency, max_queue_size=args.max_queue)
        try:
            demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                        allowed_paths=[examples_dir], max_file_size=MAX_UPLOAD_BYTES, footer_links=["api"],
                        css=PAGE_CSS)
        except OSError as err:  # port taken, address not on this machine: a message instead of a traceback
            raise SystemExit(f"parrot.serve.demo: cannot listen on {args.host}:{args.port} ({err}); "
                             "choose another --port / --host") from err


if __name__ == "__main__":
    main()
