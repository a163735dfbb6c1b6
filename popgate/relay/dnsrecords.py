"""``popgate dns records``: the DNS records an office publishes for direct delivery.

For each mail domain: ``MX`` (this host), ``SPF`` (RFC 7208: only the MX may send),
``DKIM`` (RFC 6376: the TXT record of each key in the key directory), ``DMARC`` (RFC
7489: start with ``p=none`` and reports, tighten later); for the host: ``A`` and the
``PTR`` that must name it back (receivers compare it with the HELO name, RFC 5321
§4.1.4 and their own policies).  Then the ``dig`` commands that check each one.
Text only: nothing is looked up.  docs/deployment.md explains the records.
"""

from __future__ import annotations

import ipaddress
import os

from popgate.relay import sign

PLACEHOLDER_IP = "192.0.2.10"  # RFC 5737 documentation address: replace it


def mail_domains(config, explicit: list[str]) -> list[str]:
    if explicit:
        return [d.lower().rstrip(".") for d in explicit]
    found = list(config.server.domains)
    try:
        names = sorted(os.listdir(config.dkim_key_dir))
    except FileNotFoundError:
        names = []
    found += [n.rsplit(".", 2)[0] for n in names if n.endswith(".key") and n.count(".") >= 3]
    return list(dict.fromkeys(d.lower() for d in found))


def _keys(key_dir: str, domain: str) -> list[str]:
    try:
        names = sorted(os.listdir(key_dir))
    except FileNotFoundError:
        return []
    prefix = domain + "."
    return [n[len(prefix):-len(".key")] for n in names
            if n.startswith(prefix) and n.endswith(".key") and "." not in n[len(prefix):-4]]


def describe(config, explicit: list[str], ip: str) -> str:
    host = config.hostname
    address = ip or PLACEHOLDER_IP
    kind = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
    reverse = ipaddress.ip_address(address).reverse_pointer
    lines = [f"; popgate: DNS records for direct delivery from {host}"]
    if not ip:
        lines.append(f"; replace {PLACEHOLDER_IP} with this server's public address (--ip)")
    lines += [f"{host}. IN {kind} {address}",
             f"{reverse}. IN PTR {host}.   ; set by whoever owns the address (your ISP)"]
    checks = [f"dig +short {kind} {host}", f"dig +short -x {address}"]
    for domain in mail_domains(config, explicit):
        lines += ["", f"; {domain}",
                  f"{domain}. IN MX 10 {host}.",
                  f'{domain}. IN TXT "v=spf1 mx -all"',
                  f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@{domain}"']
        checks += [f"dig +short MX {domain}", f"dig +short TXT {domain}",
                   f"dig +short TXT _dmarc.{domain}"]
        selectors = _keys(config.dkim_key_dir, domain)
        if not selectors:
            lines.append(f"; no DKIM key: popgate dkim keygen --domain {domain}")
        for selector in selectors:
            lines.append(sign.public_record(config.dkim_key_dir, domain, selector))
            checks.append(f"dig +short TXT {selector}._domainkey.{domain}")
    lines += ["", "; check them (each answer must match the record above):"]
    lines += [f";   {command}" for command in checks]
    return "\n".join(lines) + "\n"
