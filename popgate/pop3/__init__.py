"""POP3 side: the protocol (server) and the realm, its only way to the mail."""
