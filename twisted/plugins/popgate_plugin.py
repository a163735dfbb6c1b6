"""twistd plugin declaration for popgate; everything else lives in popgate.tap."""

from twisted.application.service import ServiceMaker

popgate = ServiceMaker(
    "popgate",
    "popgate.tap",
    "SMTP receiver and POP3 server over per-user Maildirs",
    "popgate",
)
