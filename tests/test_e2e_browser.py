"""The lab dashboard in a real browser: headless Chromium driven by Selenium.

The test opens the page of a real ``twistd -n popgate``, then talks SMTP and POP3 to it
from raw sockets, step by step, and waits for the page to show each step live: the SMTP
session and its arrow to the mailbox, the message in ``new/``, a second message being
received (its ``tmp/`` file), the POP3 session in TRANSACTION with the first message
marked deleted, and after QUIT the first message gone, the second still there.  It saves
a screenshot (``dashboard.png``, while the message is marked deleted, and
``dashboard-after-quit.png``) under this test's directory in ``_trial_temp`` and prints
their paths.  Needs ``chromium`` and ``chromedriver`` (Debian ``chromium``,
``chromium-driver``; ``.ci/run`` installs them) and the ``selenium`` package (the
``test`` extra): skipped without them, except under CI.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import read_reply, require_tool, start_twistd

USER, PASSWORD = "alice@example.org", "lab-password"
TIMEOUT = 20
LOCAL = "tcp:0:interface=127.0.0.1"
MAILBOX = f'.mailbox[data-user="{USER}"]'


def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            raise
        raise SkipTest("selenium is not installed (pip install -e '.[test]')") from None
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1280,1000",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


class Line:
    """A raw client connection: send a line, read one reply (SMTP or POP3 first line)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def smtp(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return read_reply(self.file)

    def pop3(self, line: str, multiline: bool = False) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        reply = self.file.readline()
        while multiline and not reply.endswith(b"\r\n.\r\n"):
            reply += self.file.readline()
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class DashboardBrowserTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_push_and_pull_appear_live(self):
        driver = yield threads.deferToThread(browser)
        self.addCleanup(threads.deferToThread, driver.quit)
        server = yield start_twistd(self, {"web": {"listen": [LOCAL]}},
                                    users=[(USER, PASSWORD)])
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        shots = yield threads.deferToThread(self.scenario, driver, server)
        for shot in shots:
            with open(shot, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            print(f"\ndashboard screenshot: {shot}")

    def scenario(self, driver, server) -> list[str]:
        """Blocking (browser and sockets): run in a thread."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as shown
        from selenium.webdriver.support.wait import WebDriverWait

        wait = WebDriverWait(driver, TIMEOUT)

        def text_of(selector: str) -> str:
            located = shown.visibility_of_element_located((By.CSS_SELECTOR, selector))
            return wait.until(located).text

        def gone(selector: str) -> None:
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, selector))

        driver.get(f"http://127.0.0.1:{server.port('web')}/")
        wait.until(shown.text_to_be_present_in_element((By.ID, "status"), "live"))
        self.assertIn(USER, text_of(MAILBOX))

        # Push: a session, its arrow to alice's mailbox, the message in new/.
        smtp = Line(server.port("SMTP"))
        smtp.smtp("EHLO browser.test")
        smtp.smtp("MAIL FROM:<teacher@example.net>")
        self.assertTrue(smtp.smtp(f"RCPT TO:<{USER}>").startswith(b"250"))
        self.assertIn(USER, text_of(".card.smtp"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wires path.push"))
        smtp.smtp("DATA")
        self.assertTrue(smtp.smtp("Subject: first\r\n\r\nHello.\r\n.").startswith(b"250"))
        text_of(f"{MAILBOX} .chip.new")
        # A second message stays half-sent while alice's client logs in.
        smtp.smtp("MAIL FROM:<teacher@example.net>")
        smtp.smtp(f"RCPT TO:<{USER}>")
        self.assertTrue(smtp.smtp("DATA").startswith(b"354"))
        self.assertIn("receiving", text_of(f"{MAILBOX} .chip.writing"))

        # Pull: the POP3 state, a message marked deleted.
        pop3 = Line(server.port("POP3"))
        pop3.pop3(f"USER {USER}")
        self.assertTrue(pop3.pop3(f"PASS {PASSWORD}").startswith(b"+OK"))
        wait.until(shown.text_to_be_present_in_element(
            (By.CSS_SELECTOR, ".card.pop3 .states .now"), "TRANSACTION"))
        pop3.pop3("RETR 1", multiline=True)
        self.assertTrue(pop3.pop3("DELE 1").startswith(b"+OK"))
        self.assertIn("DELE #1", text_of(f"{MAILBOX} .chip.marked"))
        first = os.path.join(self.directory, "dashboard.png")
        driver.save_screenshot(first)
        self.assertNotIn(PASSWORD, driver.page_source)

        # The second message arrives; QUIT removes the first, not the second (the POP3
        # session lists what was there when it logged in).
        self.assertTrue(smtp.smtp("Subject: second\r\n\r\nAgain.\r\n.").startswith(b"250"))
        smtp.smtp("QUIT")
        smtp.close()
        gone(".card.smtp")
        self.assertIn("2 message(s) delivered", text_of("#recent-sessions details"))
        self.assertTrue(pop3.pop3("QUIT").startswith(b"+OK"))
        pop3.close()
        gone(".card.pop3")
        gone(f"{MAILBOX} .chip.marked")
        wait.until(shown.text_to_be_present_in_element(
            (By.CSS_SELECTOR, f"{MAILBOX} .totals"), "1 message,"))
        self.assertEqual(len(driver.find_elements(By.CSS_SELECTOR, f"{MAILBOX} .chip.new")), 1)
        after = os.path.join(self.directory, "dashboard-after-quit.png")
        driver.save_screenshot(after)
        return [first, after]
