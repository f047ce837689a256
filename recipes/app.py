"""Serve the synthesis page: paint a semantic map, get samples from a trained GPT (+ its stage-1 model).

    python recipes/app.py --gpt runs/demo/stage2/export            # http://127.0.0.1:7860/
    python recipes/app.py --gpt runs/gpt/export --port 8000 --shards data/ade/val

Needs the app extra (`pip install .[app]`). Listens on 127.0.0.1 only unless --host says otherwise; nothing is
fetched from the network. A bad --gpt does not stop the server: the page says what is wrong and can load another
export. The page and its API are described in svq_fast/app/server.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", required=True, help="stage-2 export directory (model.safetensors + config.json)")
    p.add_argument("--stage1", default="", help="stage-1 export (default: the one the GPT's config names)")
    p.add_argument("--shards", default="", help="held-out shards for 'load a held-out map' (default: data.val_shards)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="0 = any free port (the address is printed)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for sampling (0 = torch's default)")
    p.add_argument(
        "--allow-stage1-mismatch",
        action="store_true",
        help="use a stage-1 export even if its weights differ from the ones the GPT was trained on",
    )
    args = p.parse_args(argv)

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from svq_fast.app.server import AppState, bind, serve
    except ImportError as e:
        print(f"app.py: {e}; install the app extra: pip install -e '.[app]' (or `make app`)", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sock = bind(args.host, args.port)
    state = AppState(
        args.gpt,
        stage1=args.stage1,
        shards=args.shards,
        device=device,
        threads=args.threads,
        allow_stage1_mismatch=args.allow_stage1_mismatch,
    )
    if state.load_error:
        print(f"app.py: {state.load_error}\n(the page shows this and can load another export)", file=sys.stderr)
    else:
        info = state.synth.info()
        print(f"app.py: {info['gpt']} ({info['gpt_summary']}; {info['size']}x{info['size']}, {device})")
    host, port = sock.getsockname()[:2]
    print(f"app.py: serving http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        serve(state, sock)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
