"""The architecture's rules, checked from the modules' imports (docs/design.md).

Each rule names who may not import whom; a rule broken by a new import fails here with
the module and the import, before it becomes a tangle.
"""

from __future__ import annotations

import ast
import pathlib

from twisted.trial.unittest import TestCase

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "popgate"


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules(under: str) -> dict[str, set[str]]:
    base = PACKAGE / under if under else PACKAGE
    paths = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else base.rglob("*.py")
    return {str(p.relative_to(ROOT)): imports_of(p) for p in paths}


def offending(under: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} imports {name}" for module, names in sorted(modules(under).items())
            for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


class LayerRuleTests(TestCase):
    def test_the_store_knows_no_protocol_no_twisted_and_no_auth(self):
        self.assertEqual(offending("store", ("popgate.smtp", "popgate.pop3", "popgate.auth",
                                             "popgate.observe", "popgate.web", "twisted")), [])

    def test_relay_knows_no_protocol_and_the_store_knows_no_relay(self):
        """relay/ reaches local mail only through what the wiring point injects (the
        bounce delivery); its queue files and DSNs are plain code, without Twisted."""
        self.assertEqual(offending("relay", ("popgate.smtp", "popgate.pop3", "popgate.auth",
                                             "popgate.observe", "popgate.web",
                                             "popgate.service")), [])
        for module in ("relay/queue", "relay/dsn"):
            self.assertEqual(offending(module, ("twisted",)), [], module)
        self.assertEqual(offending("store", ("popgate.relay",)), [])

    def test_smtp_and_pop3_never_import_each_other(self):
        self.assertEqual(offending("smtp", ("popgate.pop3",)), [])
        self.assertEqual(offending("pop3", ("popgate.smtp",)), [])

    def test_the_pop3_protocol_reaches_mail_only_through_the_realm(self):
        self.assertEqual(offending("pop3/server", ("popgate.store",)), [])

    def test_protocols_never_import_their_observers(self):
        for layer in ("smtp", "pop3", "auth", "lineproto", "events"):
            self.assertEqual(offending(layer, ("popgate.observe", "popgate.web",
                                               "popgate.service")), [], layer)

    def test_nothing_below_the_wiring_point_imports_an_observer(self):
        """Rule 4 for every module, not only the protocols: only service.py (and tap.py,
        for the JSON log) reach observe/ and web/, which reach each other."""
        above = ("popgate/service.py", "popgate/tap.py", "popgate/workers/__main__.py",
                 "popgate/observe/", "popgate/web/")
        found = [f"{module} imports {name}" for module, names in sorted(modules("").items())
                 if not module.startswith(above) for name in sorted(names)
                 if name.startswith(("popgate.observe", "popgate.web", "popgate.service"))]
        self.assertEqual(found, [])

    def test_observers_know_only_the_events(self):
        """The trace, metrics, logs and dashboard see sessions only through the events
        (and the Maildirs through the store's read-only survey)."""
        for layer in ("observe", "web"):
            self.assertEqual(offending(layer, ("popgate.smtp", "popgate.pop3", "popgate.auth",
                                               "popgate.lineproto", "popgate.service")),
                             [], layer)

    def test_shared_layers_import_no_protocol(self):
        shared = ("addresses", "codec", "config", "events", "fileio", "limits", "lineproto",
                  "loglimit", "proxy", "tls", "auth", "relay")
        for layer in shared:
            self.assertEqual(offending(layer, ("popgate.smtp", "popgate.pop3",
                                               "popgate.service")), [], layer)

    def test_only_the_entry_points_import_the_service(self):
        """twistd's (tap.py) and a worker process's (popgate.workers.__main__)."""
        importers = [module for module, names in modules("").items()
                     if "popgate.service" in names or any(n.startswith("popgate.service.")
                                                          for n in names)]
        self.assertEqual(sorted(importers), ["popgate/tap.py", "popgate/workers/__main__.py"])

    def test_the_worker_pool_knows_no_protocol(self):
        """It passes sockets, configuration and log lines; the wiring is service.py's."""
        self.assertEqual(offending("workers/pool", (
            "popgate.smtp", "popgate.pop3", "popgate.auth", "popgate.store", "popgate.relay",
            "popgate.lineproto", "popgate.service")), [])

    def test_the_plugin_only_declares(self):
        plugin = ROOT / "twisted" / "plugins" / "popgate_plugin.py"
        self.assertEqual(imports_of(plugin), {"twisted.application.service",
                                              "twisted.application.service.ServiceMaker"})

    def test_config_does_no_lookups_at_attribute_access(self):
        tree = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
        properties = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                      and any(getattr(d, "id", None) == "property" for d in node.decorator_list)]
        calls = {ast.unparse(call.func) for prop in properties for call in ast.walk(prop)
                 if isinstance(call, ast.Call)}
        # Pure computations only (joining paths, a truth value): no file, no host lookup.
        self.assertEqual(calls - {"os.path.join", "bool"}, set())
