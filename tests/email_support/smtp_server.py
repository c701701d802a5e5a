"""A real SMTP server for the email tests (aiosmtpd), on the port given.

Usage: smtp_server.py PORT DIR [MODE CERTDIR USER PASSWORD]. Every accepted
message is written to DIR/<n>.eml exactly as received, and beside it
DIR/<n>.json says how it came: `{"tls": bool, "login": user or null}`.
Recipients whose local part starts with `reject5` are refused with 550,
`reject4` with 451 (a transient failure). Prints `ready` once listening.

MODE is `plain` (the default: no TLS, no AUTH), `starttls` (STARTTLS
required before anything else) or `tls` (implicit TLS); with TLS the
server uses CERTDIR/cert.pem and CERTDIR/key.pem and requires AUTH (PLAIN
or LOGIN) as USER with PASSWORD: anything else is refused with 535.
"""
import asyncio, json, os, ssl, sys, warnings
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, out):
        self.out = out
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if local.startswith("reject5"):
            return "550 5.1.1 No such user here"
        if local.startswith("reject4"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        tls = server.transport.get_extra_info("ssl_object") is not None
        auth = getattr(session, "auth_data", None)
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        with open(os.path.join(self.out, f"{self.n:04}.json"), "w") as f:
            json.dump({"tls": tls, "login": login}, f)
        tmp = os.path.join(self.out, f".{self.n}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.out, f"{self.n:04}.eml"))
        return "250 Message accepted for delivery"


def main():
    # aiosmtpd warns about AUTH without STARTTLS (implicit TLS is TLS too)
    # and about its own use of a deprecated attribute.
    warnings.simplefilter("ignore")
    port, out = int(sys.argv[1]), sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
    kwargs = {}
    if mode != "plain":
        certs, user, password = sys.argv[4], sys.argv[5].encode(), sys.argv[6].encode()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem"))

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login == user
                and auth_data.password == password
            )
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        kwargs = dict(authenticator=authenticator, auth_required=True)
        if mode == "starttls":
            kwargs.update(tls_context=ctx, require_starttls=True)
        elif mode == "tls":
            kwargs.update(ssl_context=ctx, auth_require_tls=False)
        else:
            sys.exit(f"unknown mode {mode}")
    c = Controller(Handler(out), hostname="127.0.0.1", port=port, **kwargs)
    c.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the test closes stdin (or dies)
    finally:
        c.stop()


main()
