"""Serve a trained model over the OpenAI API, with a chat page: any OpenAI client, notebook or chat UI can talk to it.

    python tools/serve.py --out_dir=out-shakespeare-chat [--host=127.0.0.1] [--port=8000] [--api_key=KEY]
    python tools/serve.py --init_from=hf-shakespeare      # a transformers directory, or gpt2* (OpenAI's weights)

Then open http://127.0.0.1:8000/ for the chat page, or point a client at http://127.0.0.1:8000/v1 (GET /v1/models,
POST /v1/completions, POST /v1/chat/completions; stream=true streams server-sent events as OpenAI's do). A chat
request needs a chat model (fine-tuned on a chat dataset); a base model answers /v1/completions, and a chat request
gets a 400 saying so. /v1/completions also scores text (echo, logprobs, max_tokens=0, token-id prompts) and
/tokenize, /detokenize and /tokenizer_info serve the tokenizer, which is what lm-evaluation-harness needs:
    lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions,model=ID,max_length=N
(N: the model's block_size + 1; docs/evaluation.md). Ctrl-C stops it.
"""
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback


from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import parse_bool, tool_parser
from gpt_toolkit.core.errors import UserError, import_optional, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.source import RESUME, ModelSource, load_model
from gpt_toolkit.serving.server import API, Engine, Limits, is_loopback, serve


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--out_dir", default="out", help="the run to serve (its ckpt.pt, or --checkpoint)")
    p.add_argument("--checkpoint", default=BEST, help="which checkpoint of out_dir (default ckpt.pt, the best)")
    p.add_argument("--init_from", default="resume", help="resume (out_dir), a transformers directory, or gpt2*")
    p.add_argument("--model_name", default="", help="the model's id in the API (default: out_dir's name)")
    p.add_argument("--host", default="127.0.0.1", help="where to listen (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api_key", default="", help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--max_tokens", type=int, default=2048, help="the most tokens one request may ask for (default 2048)")
    p.add_argument("--max_n", type=int, default=8, help="the most choices (n) one request may ask for (default 8)")
    p.add_argument("--max_body_kb", type=int, default=1024, help="the largest request body, in kB (default 1024)")
    p.add_argument("--max_messages", type=int, default=2048, help="the most messages in one chat request (default 2048)")
    p.add_argument("--max_chars", type=int, default=262144,
                   help="the most characters of one request's prompt or messages together (default 262144)")
    p.add_argument("--read_timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's headers, and again its body (default 30)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--dtype", default="auto", choices=hardware.DTYPE_CHOICES, help="precision (default auto)")
    p.add_argument("--verify_checkpoint", type=parse_bool, default=True, help="check the checkpoint's checksum")
    return p


def main(argv):
    args = parser().parse(argv)[0]
    if not 0 < args.port < 65536:
        raise UserError(f"--port={args.port} is not a port: use 1 to 65535")
    if min(args.max_tokens, args.max_n, args.max_body_kb, args.max_messages, args.max_chars) < 1:
        raise UserError("--max_tokens, --max_n, --max_body_kb, --max_messages and --max_chars must be positive")
    if not 0 < args.read_timeout < float("inf"):
        raise UserError(f"--read_timeout={args.read_timeout} must be a positive number of seconds")
    source = ModelSource.parse(args.init_from, out_dir=args.out_dir, allowed=(RESUME,))
    for package in ("fastapi", "uvicorn"):  # both in one install, so a missing one is not found after the other
        import_optional(package, "tools/serve.py", install="pip install -r requirements-optional.txt (FastAPI and uvicorn)")
    listen(args.host, args.port).close()  # a port that is taken is one line before the model loads
    device = hardware.resolve_device(args.device)
    dtype = hardware.resolve_dtype(args.dtype, device)
    setup_process(device, keep_cpu_memory=False)
    print(f"loading {source.name} on {device} ({dtype}) ...", file=sys.stderr, flush=True)  # then "serving" (stdout)
    model, tokenizer = load_model(source, device, checkpoint=args.checkpoint, verify=args.verify_checkpoint, dtype=dtype)
    model_id = args.model_name or source.name
    engine = Engine(model, tokenizer, device=device, ctx=hardware.autocast(device, dtype),
                    report=lambda line: print(line, file=sys.stderr, flush=True))
    api = API(engine, model_id=model_id, block_size=model.config.block_size, api_key=args.api_key or None,
              limits=Limits(max_tokens=args.max_tokens, n=args.max_n, body_bytes=args.max_body_kb * 1024,
                            messages=args.max_messages, chars=args.max_chars, read_seconds=args.read_timeout))
    listening = listen(args.host, args.port)  # before the line: a client that connects on it is queued, not refused
    where = f"http://{args.host}:{args.port}"
    kind = "a chat model" if api.is_chat else "a base model (chat requests get a 400: use /v1/completions)"
    print(f"serving '{model_id}' ({kind}, {model.get_num_params() / 1e6:.2f}M parameters, {device}, {dtype}) at "
          f"{where}/v1; the chat page is {where}/", flush=True)
    if not is_loopback(args.host):
        print(f"note: --host={args.host} is reachable from the network: anyone who can reach this machine can use "
              f"the model{'' if args.api_key else ' (--api_key=KEY asks for a key)'}", flush=True)
    stopped_by = serve(api, sock=listening, report=engine.report)  # until Ctrl-C or SIGTERM
    print("server stopped", flush=True)
    return 128 + signal.SIGTERM if stopped_by == signal.SIGTERM else 0  # 143, as a process SIGTERM ends


def listen(host, port):
    """A socket listening on host:port, or one line refusing a port that is taken or a host that is not this
    machine's."""
    sock = None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn does: localhost is 127.0.0.1, which
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]  # clients (lm-eval) hard-code
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        if sock is not None:
            sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port (or --host)") from None
    return sock


if __name__ == "__main__":
    run_main(main)
