"""A minimal aiosmtpd server delivering to Maildirs, the "naive Python" SMTP peer.

Run as ``python benchmarks/aiosmtpd_peer.py --port P --mail-root DIR --domain D``.
Recipients must be in the domain; each message is added (LF line ends) to
``<mail-root>/<domain>/<local>/Maildir`` with ``mailbox.Maildir.add`` (which fsyncs the
file before linking it into new/).  The handler runs on the event loop, as a simple
aiosmtpd deployment would.  Needs the ``aiosmtpd`` package; imports nothing of popgate.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP


class MaildirHandler:
    """aiosmtpd handler: accept local recipients, store each message in Maildirs."""

    def __init__(self, mail_root: Path, domain: str) -> None:
        self.mail_root = mail_root
        self.domain = domain.lower()
        self.boxes: dict[str, mailbox.Maildir] = {}

    def box(self, local: str) -> mailbox.Maildir:
        """The (cached) Maildir of a local part."""
        if local not in self.boxes:
            path = self.mail_root / self.domain / local / "Maildir"
            self.boxes[local] = mailbox.Maildir(path, factory=None, create=True)
        return self.boxes[local]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        """Accept addresses in our domain, refuse relaying."""
        local, _, domain = address.rpartition("@")
        if not local or domain.lower() != self.domain:
            return "554 5.7.1 Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        """Deliver the message to every recipient's Maildir."""
        data = envelope.original_content.replace(b"\r\n", b"\n")
        for rcpt in envelope.rcpt_tos:
            self.box(rcpt.rpartition("@")[0].lower()).add(data)
        return "250 2.0.0 Message accepted for delivery"


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    handler = MaildirHandler(Path(args.mail_root), args.domain)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=args.hostname, data_size_limit=args.max_size,
                     enable_SMTPUTF8=True),
        host=args.host, port=args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mail-root", required=True)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--hostname", default="bench.test")
    parser.add_argument("--max-size", type=int, default=100 * 1024 * 1024)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
