"""``email``: sends one message over SMTP to the server in ``[smtp]``."""

from __future__ import annotations

import fnmatch
import re
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import aiosmtplib

from asyncnode import Config, Field, PermanentError, TaskContext, ValidationError, task

#: One bare address: no display name, no list, no spaces, exactly one "@".
_ADDRESS = re.compile(r"[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def recipient_allowed(address: str, allow: tuple[str, ...]) -> bool:
    """Whether ``[smtp] allow`` (addresses or ``*@domain`` patterns; empty: any) admits ``address``."""
    return not allow or any(fnmatch.fnmatchcase(address.lower(), pattern.lower()) for pattern in allow)


def validate_email(payload: dict[str, Any], cfg: Config) -> None:
    """Refuse anything but one plain, allowed address, and CR/LF in headers (header injection)."""
    for name in ("to", "subject"):
        if "\r" in payload[name] or "\n" in payload[name]:
            raise ValidationError(f"payload.{name} must not contain line breaks", name)
    if not _ADDRESS.fullmatch(payload["to"]):
        raise ValidationError("payload.to must be one e-mail address, like name@example.com", "to")
    if not recipient_allowed(payload["to"], cfg.smtp.allow):
        raise ValidationError("payload.to is not an allowed recipient ([smtp] allow)", "to")


@task(
    "email",
    description="Send an e-mail over SMTP",
    fields=[
        Field("to", description="recipient address", max_length=254, format="email"),
        Field("subject", description="subject line", max_length=200),
        Field("body", description="message text", multiline=True),
    ],
    validate=validate_email,
)
async def send_email(payload: dict[str, Any], ctx: TaskContext) -> dict[str, str]:
    """Send the message; return the recipient and the Message-ID."""
    smtp = ctx.config.smtp
    msg = EmailMessage()
    msg["From"] = smtp.sender
    msg["To"] = payload["to"]
    msg["Subject"] = payload["subject"]
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(idstring=ctx.id.split("-")[0], domain=smtp.sender.rpartition("@")[2] or None)
    msg["X-Asyncnode-Task"] = ctx.id
    msg.set_content(payload["body"])
    try:
        await aiosmtplib.send(
            msg,
            hostname=smtp.host,
            port=smtp.port,
            username=smtp.username or None,
            password=smtp.password or None,
            start_tls=smtp.starttls,
            timeout=smtp.timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as e:
        if all(r.code >= 500 for r in e.recipients):
            raise PermanentError(f"SMTP server refused the recipient: {e.recipients[0].message}") from e
        raise
    except aiosmtplib.SMTPResponseException as e:
        # 5xx is a permanent rejection; 4xx (and an unreachable server) are worth retrying.
        if e.code >= 500:
            raise PermanentError(f"SMTP server rejected the message: {e.code} {e.message}") from e
        raise
    return {"to": payload["to"], "message_id": msg["Message-ID"]}
