"""A real SMTP server for the email tests (aiosmtpd), on the port given.

Usage: smtp_server.py PORT DIR. Every accepted message is written to
DIR/<n>.eml exactly as received. Recipients whose local part starts with
`reject5` are refused with 550, `reject4` with 451 (a transient failure).
Prints `ready` once listening.
"""
import asyncio, os, sys
from aiosmtpd.controller import Controller


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
        tmp = os.path.join(self.out, f".{self.n}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.out, f"{self.n:04}.eml"))
        return "250 Message accepted for delivery"


def main():
    port, out = int(sys.argv[1]), sys.argv[2]
    c = Controller(Handler(out), hostname="127.0.0.1", port=port)
    c.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the test closes stdin (or dies)
    finally:
        c.stop()


main()
