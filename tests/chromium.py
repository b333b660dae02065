"""Headless Chromium driven by Selenium, for the tests and benchmarks that look at a page as a person would.

Uses Debian's chromium and chromium-driver (scripts/setup_env.sh installs them): never Selenium Manager, which
would download a browser or a driver.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator["object"]:
    """A selenium WebDriver on a fresh profile; quits the browser and removes the profile afterwards."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            raise RuntimeError(f"{path} is missing: run bash scripts/setup_env.sh (apt-get install chromium "
                               f"chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mrkd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
