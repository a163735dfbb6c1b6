"""Installing popgate in a fresh virtual environment, as a new user would.

Both a regular and an editable install must make ``twistd --help`` list popgate, put the
``popgate`` command on the PATH, ship the sample configuration and the systemd units
(``popgate config example``, ``popgate init --systemd``), and run ``twistd -n popgate`` on
its defaults until SIGTERM.  Each test removes the virtual environment it built.
Setuptools' editable installs and Twisted's plugin discovery do not always agree
(DESIGN.md), so both are checked for real.  Needs the package index (or a pip cache).
"""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

from tests.harness import REPO, read
from tests.test_config import SAMPLE

_IGNORE = shutil.ignore_patterns(".git", ".venv", "_trial_temp*", "build", "dist",
                                 "*.egg-info", "__pycache__", "popgate-data")


class PluginTests(TestCase):
    def test_plugin_is_discovered(self):
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("popgate", names)

    def test_plugin_file_is_only_a_declaration(self):
        path = os.path.join(REPO, "twisted", "plugins", "popgate_plugin.py")
        with open(path, encoding="utf-8") as f:
            code = f.read()
        self.assertIn("ServiceMaker(", code)
        self.assertNotIn("def ", code)
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "plugins", "__init__.py")))


class FreshVenvTests(TestCase):
    timeout = 900

    def install(self, editable: bool) -> str:
        """Copy the source tree, make a venv and pip install into it; return its bin/."""
        work = os.path.abspath(self.mktemp())
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)  # ~100 MB each
        source = os.path.join(work, "src")
        shutil.copytree(REPO, source, ignore=_IGNORE)
        venv = os.path.join(work, "venv")
        # A fresh environment means no PYTHONPATH either (trial -j sets one for its
        # workers): pip would take Twisted from it as "already satisfied".
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120, env=env)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
               "--disable-pip-version-check"]
        subprocess.run([*pip, *(["-e"] if editable else []), source], check=True,
                       timeout=600, cwd=work, env=env)
        return os.path.join(venv, "bin")

    def check_installation(self, bin_dir: str) -> None:
        # Run from an empty directory: nothing may be found through the current directory.
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

        help_text = subprocess.run([os.path.join(bin_dir, "twistd"), "--help"], cwd=cwd,
                                   env=env, capture_output=True, text=True, timeout=60).stdout
        self.assertRegex(help_text, r"\n\s+popgate\s+SMTP receiver and POP3 server")

        version = subprocess.run(["popgate", "--version"], cwd=cwd, env=env,
                                 capture_output=True, text=True, timeout=60)
        self.assertRegex(version.stdout, r"^popgate \d+\.\d+")

        self.check_shipped_files(bin_dir, cwd, env)

        self.check_twistd_runs(bin_dir, cwd, env)

    def check_shipped_files(self, bin_dir: str, cwd: str, env: dict) -> None:
        plugin_help = subprocess.run([os.path.join(bin_dir, "twistd"), "popgate", "--help"],
                                     cwd=cwd, env=env, capture_output=True, text=True,
                                     timeout=60).stdout
        self.assertIn("`popgate config example` prints a", plugin_help)
        example = subprocess.run(["popgate", "config", "example"], cwd=cwd, env=env,
                                 capture_output=True, text=True, timeout=60)
        self.assertEqual(example.stdout, read(SAMPLE).decode("utf-8"))
        owner = pwd.getpwuid(os.geteuid()).pw_name
        init = subprocess.run(["popgate", "--config", "first.toml", "--data-dir", "first",
                               "init", "--user", "boss@example.org", "--password-stdin",
                               "--scheme", "BLF-CRYPT", "--systemd", "units", "--owner", owner],
                              cwd=cwd, env=env, input="pw\n", capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(init.returncode, 0, init.stderr)
        service = read(os.path.join(cwd, "units", "popgate.service")).decode("utf-8")
        self.assertIn(f"\nExecStart={os.path.join(bin_dir, 'twistd')} --nodaemon", service)
        self.assertEqual(len(os.listdir(os.path.join(cwd, "units"))), 6)
        shutil.rmtree(os.path.join(cwd, "first"))
        # The dashboard's page, style and script are package data: they must install too.
        assets = subprocess.run(
            [os.path.join(bin_dir, "python"), "-c", "from importlib.resources import files; "
             "s = files('popgate.web') / 'static'; print(sorted(p.name for p in s.iterdir()))"],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(assets.stdout.strip(),
                         "['favicon.svg', 'index.html', 'lab.css', 'lab.js']", assets.stderr)

    def check_twistd_runs(self, bin_dir: str, cwd: str, env: dict) -> None:
        args = [os.path.join(bin_dir, "twistd"), "-n", "--pidfile=", "--logfile=-", "popgate",
                "--smtp", "tcp:0:interface=127.0.0.1", "--pop3", "tcp:0:interface=127.0.0.1",
                "--submission", "tcp:0:interface=127.0.0.1"]
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        output = b""
        try:
            deadline = time.monotonic() + 60
            while b"popgate ready" not in output and time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    break
                output += line
            self.assertEqual(output.count(b"listening on"), 3, output.decode())
            self.assertRegex(output.decode(), r"popgate SMTP listening on tcp:0:interface=")
            self.assertRegex(output.decode(), r"popgate POP3 listening on tcp:0:interface=")
            self.assertRegex(output.decode(), r"popgate SUBMISSION listening on tcp:0:interface=")
            process.send_signal(signal.SIGTERM)
            rest, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        # twistd shuts down, then re-raises SIGTERM so the exit status says why it ended
        # (systemd counts that as a clean stop).
        self.assertEqual(process.returncode, -signal.SIGTERM, (output + rest).decode())
        self.assertIn(b"Server Shut Down.", rest)
        self.assertNotIn(b"Traceback", output + rest)
        data = os.path.join(cwd, "popgate-data")
        self.assertEqual(os.stat(data).st_mode & 0o777, 0o700)

    def test_regular_install(self):
        self.check_installation(self.install(editable=False))

    def test_editable_install(self):
        self.check_installation(self.install(editable=True))


class TwistdStartupErrorTests(TestCase):
    """A bad configuration or a busy port stops twistd with one line and exit status 1."""

    def test_bad_config_one_line_no_traceback(self):
        path = os.path.join(REPO, "tests", "fixtures", "bad-config", "wrong-type.toml")
        env = dict(os.environ, PYTHONPATH=REPO)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run([twistd, "-n", "--pidfile=", "popgate", "--config", path],
                                env=env, capture_output=True, text=True, timeout=60,
                                cwd=os.path.abspath(self.mktemp().rpartition("/")[0] or "."))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f"popgate: {path}: smtp.max_message_size: "
                                        "expected an integer, got 'big'\n")

    def test_unknown_option(self):
        env = dict(os.environ, PYTHONPATH=REPO)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run([twistd, "-n", "popgate", "--smtp"], env=env,
                                capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertTrue(re.search(r"option --smtp requires argument", result.stdout))

    def test_port_in_use(self):
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=REPO)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "-n", "--pidfile=", "popgate", "--data-dir", os.path.abspath(self.mktemp()),
             "--smtp", f"tcp:{port}:interface=127.0.0.1", "--pop3", "tcp:0:interface=127.0.0.1"],
            env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stdout + result.stderr,
                         rf"popgate: SMTP cannot listen on tcp:{port}:interface=127.0.0.1: "
                         r".*Address already in use")
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_port_in_use_daemonised(self):
        # Without -n, twistd's parent waits for its daemon child's word: it must get it
        # (and exit 1), not wait for ever on a child that ended.
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "--pidfile", os.path.join(work, "twistd.pid"), "--logfile",
             os.path.join(work, "twistd.log"), "popgate", "--data-dir",
             os.path.join(work, "data"), "--smtp", f"tcp:{port}:interface=127.0.0.1",
             "--pop3", "tcp:0:interface=127.0.0.1"],
            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
            timeout=60, cwd=work)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"An error has occurred: b'popgate.service.StartupFailed: popgate: "
                      f"SMTP cannot listen on tcp:{port}", result.stderr)
        self.assertIn(f"popgate: SMTP cannot listen on tcp:{port}:interface=127.0.0.1: ",
                      read(os.path.join(work, "twistd.log")).decode())
