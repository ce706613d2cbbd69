"""TLS for the test stand-ins of engines (tiny_service.py, openai_upstream.py): they take the key and certificate
as the real engines do (vLLM's and our Whisper server's `--ssl-keyfile`, llama.cpp's `--ssl_keyfile`), so the
portal talks to them exactly as to a real service. Imported by path (the stand-ins run as scripts)."""
import ssl


def add_arguments(parser) -> None:
    parser.add_argument("--ssl-keyfile", "--ssl_keyfile", dest="ssl_keyfile", default=None)
    parser.add_argument("--ssl-certfile", "--ssl_certfile", dest="ssl_certfile", default=None)


def serve_tls(server, args) -> None:
    """Make a socketserver listen with TLS when the job passed a key and certificate."""
    if args.ssl_keyfile and args.ssl_certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        # the handshake happens in each request's thread, so a client that never finishes it blocks nobody
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
