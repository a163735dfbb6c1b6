"""SMTP side: the ESMTP/LMTP protocol (server), its session state, replies, and delivery
(routing, durable Maildir delivery, the message-check seam)."""
