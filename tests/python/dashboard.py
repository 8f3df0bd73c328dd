"""Drives the hub's web dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) through Selenium. Reads on stdin:

  {"hub": URL, "token": ADMIN_TOKEN, "viewer": VIEWER_TOKEN, "devices": [ID...],
   "chart_device": ID, "json_device": ID, "job": NAME, "log_text": TEXT, "shots": DIR}

signs in through the page's form, visits every page, runs the job from the Jobs page and follows
its log, and prints what it saw as JSON: per page, the console errors and what the page showed;
screenshots (wide, phone-sized, dark) go to DIR. Waits are bounded; a page that never finishes
drawing is reported, not waited on for ever.

With {"bench": true, "hub": URL, "token": T, "chart_device": ID, "runs": N} it instead times
the Fleet page and the Device page's 7-day charts N times each (the pages' own performance
marks, from navigation start) and prints the figures. With {"watch": SECONDS, "hub": URL,
"token": T} it keeps the Fleet page open that long and prints how often it refreshed. With
{"oidc": true, "hub": URL} it signs in through the hub's OpenID Connect issuer and prints who
the page says is signed in.
"""
import base64
import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

req = json.load(sys.stdin)
hub = req["hub"].rstrip("/")


def browser(width=1400, height=1000):
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--lang=en-GB"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


d = browser()
wait = WebDriverWait(d, 30)


def ready(name, timeout=30):
    WebDriverWait(d, timeout).until(
        lambda x: x.execute_script("return document.body.dataset.ready") == name,
        message=f"the {name} page never finished drawing")


def console():
    """The console's errors since the last call (Chromium's SEVERE entries)."""
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def mark(name):
    return d.execute_script(
        "const m = performance.getEntriesByName(arguments[0]); return m.length ? m[0].startTime : null",
        f"shoal:{name}")


requested = set()


def collect():
    """Remembers what the page has fetched so far (its resource timing entries)."""
    requested.update(d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)") or [])


def go(url):
    collect()
    d.get(url)


def sign_in(token):
    dialog = wait.until(EC.visibility_of_element_located((By.ID, "sign-in")))
    box = d.find_element(By.ID, "token")
    box.send_keys(token)
    box.send_keys(Keys.ENTER)
    wait.until(EC.invisibility_of_element(dialog))


def click(xpath):
    """Clicks what `xpath` finds, finding it again when a refresh replaced it meanwhile."""
    WebDriverWait(d, 10, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda x: x.find_element(By.XPATH, xpath).click() or True)


def shot(name, tallest=4000):
    """The whole page (up to `tallest` pixels), not only what the window shows."""
    if not req.get("shots"):
        return
    os.makedirs(req["shots"], exist_ok=True)
    size = d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    # The capture lays the page out without a scroll bar: as wide as the window, not as the
    # content area beside the bar.
    width = max(size["width"], d.execute_script("return window.innerWidth"))
    clip = {"x": 0, "y": 0, "width": width, "height": min(size["height"], tallest), "scale": 1}
    png = d.execute_cdp_cmd("Page.captureScreenshot",
                            {"format": "png", "captureBeyondViewport": True, "clip": clip})
    with open(os.path.join(req["shots"], f"{name}.png"), "wb") as f:
        f.write(base64.b64decode(png["data"]))


def signed_in_tab(token):
    """Keeps `token` for this tab, as the sign-in form does, before any page asks the API."""
    d.get(hub + "/ui/assets/icon.svg")
    d.execute_script("sessionStorage.setItem('shoal.token', arguments[0])", token)


if req.get("bench"):
    signed_in_tab(req["token"])
    out = {"fleet_ms": [], "fleet_fetch_ms": [], "fleet_bytes": None, "device_7d_ms": [],
           "devices_shown": None, "chart_points": [], "step_7d": None}
    listing = ("const e = performance.getEntriesByType('resource')"
               ".filter(e => e.name.endsWith('/api/v1/devices'))[0];"
               "return e ? [e.duration, e.encodedBodySize] : [null, null]")
    for _ in range(req.get("runs", 5)):
        d.get(hub + "/")
        ready("fleet", 60)
        out["fleet_ms"].append(mark("fleet"))
        took, size = d.execute_script(listing)
        out["fleet_fetch_ms"].append(took)
        out["fleet_bytes"] = size
        out["devices_shown"] = d.find_element(By.ID, "shown").text
    shot("fleet", 1100)
    for _ in range(req.get("runs", 5)):
        d.get(f"{hub}/ui/devices/{req['chart_device']}?window=7d")
        ready("device", 60)
        out["device_7d_ms"].append(mark("device"))
        out["chart_points"].append(d.execute_script(
            "return [...document.querySelectorAll('figure.chart')].map(f => Number(f.dataset.points))"))
        out["step_7d"] = d.find_element(By.ID, "charts").get_attribute("data-step")
    shot("device")
    out["console"] = console()
    d.quit()
    print(json.dumps(out))
    sys.exit(0)

if req.get("oidc"):
    # "Sign in with your organisation": to the issuer and back, then the Fleet page.
    d.get(hub + "/")
    wait.until(EC.visibility_of_element_located((By.ID, "sign-in")))
    console()  # the signed-out requests' 401s are expected
    sso = wait.until(EC.element_to_be_clickable((By.ID, "sso")))
    sso.click()
    ready("fleet")
    WebDriverWait(d, 10).until(lambda x: x.find_element(By.ID, "who").text != "")
    out = {"who": d.find_element(By.ID, "who").text, "url": d.current_url, "console": console()}
    d.get(hub + "/ui/signed-in?code=forged&state=forged")
    WebDriverWait(d, 10).until(lambda x: x.find_element(By.ID, "content").text != "")
    out["unstarted"] = d.find_element(By.ID, "content").text
    d.quit()
    print(json.dumps(out))
    sys.exit(0)

if req.get("watch"):
    # A browser left open on the Fleet page for `watch` seconds (it refreshes every 10 s).
    signed_in_tab(req["token"])
    d.get(hub + "/")
    ready("fleet", 60)
    time.sleep(req["watch"])
    fetched = d.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/api/v1/devices')).length")
    d.quit()
    print(json.dumps({"fleet_fetches": fetched}))
    sys.exit(0)

out = {}

# Fleet, signed out: the form asks for a token; a wrong one is refused with the hub's reason.
go(hub + "/")
dialog = wait.until(EC.visibility_of_element_located((By.ID, "sign-in")))
d.find_element(By.ID, "token").send_keys("not-a-token", Keys.ENTER)
wait.until(lambda x: x.find_element(By.ID, "sign-in-error").text != "")
out["refused"] = d.find_element(By.ID, "sign-in-error").text
shot("sign-in")
d.find_element(By.ID, "token").clear()
d.find_element(By.ID, "token").send_keys(req["token"], Keys.ENTER)
wait.until(EC.invisibility_of_element(dialog))
console()  # the signed-out requests' 401s are expected
go(hub + "/")
ready("fleet")
want = set(req["devices"])
# The table redraws every 10 s: read it in one go, in the page, not cell by cell.
ROWS = ("return [...document.querySelectorAll('#content tbody tr')]"
        ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText))")
WebDriverWait(d, 30).until(
    lambda x: want <= {r[0] for r in x.execute_script(ROWS)},
    message="the fleet table never showed every device")
rows = {r[0]: r for r in d.execute_script(ROWS)}
out["fleet"] = {
    "rows": rows,
    "headers": [h.text for h in d.find_elements(By.CSS_SELECTOR, "#content thead th")],
    "counts": d.find_element(By.CSS_SELECTOR, ".counts").text,
    "who": d.find_element(By.ID, "who").text,
    "console": console(),
}
# Search narrows the table; sorting by a column orders it.
search = d.find_element(By.ID, "q")
search.send_keys(req["chart_device"])
WebDriverWait(d, 10).until(lambda x: len(x.execute_script(ROWS)) == 1)
out["fleet"]["searched"] = [r[0] for r in d.execute_script(ROWS)]
search.send_keys(Keys.CONTROL, "a")
search.send_keys(Keys.BACKSPACE)
WebDriverWait(d, 10).until(lambda x: len(x.execute_script(ROWS)) == len(rows))
click("//th/button[text()='Device']")
out["fleet"]["sorted_desc"] = [r[0] for r in d.execute_script(ROWS)]
click("//th/button[text()='Device']")
shot("fleet")

# Keyboard: Tab from the top reaches the skip link first, then the navigation; "/" jumps to
# the search box; Enter on a column's header sorts by it.
go(hub + "/")
ready("fleet")
tabs = []
for _ in range(3):
    ActionChains(d).send_keys(Keys.TAB).perform()
    tabs.append(d.switch_to.active_element.text)
out["keyboard"] = {"tabs": tabs}
ActionChains(d).send_keys(Keys.ESCAPE).perform()
d.execute_script("document.activeElement.blur()")
ActionChains(d).send_keys("/").perform()
out["keyboard"]["slash_focuses"] = d.switch_to.active_element.get_attribute("id")
cpu = d.find_element(By.XPATH, "//th/button[text()='CPU']")
d.execute_script("arguments[0].focus()", cpu)
ActionChains(d).send_keys(Keys.ENTER).perform()
out["keyboard"]["enter_sorts"] = d.find_element(By.XPATH, "//th[button[text()='CPU']]").get_attribute("aria-sort")

# Device: reached from its row; its charts have points.
collect()
click(f"//a[text()='{req['chart_device']}']")
ready("device")
WebDriverWait(d, 30).until(
    lambda x: any(int(f.get_attribute("data-points") or 0) > 0 for f in x.find_elements(By.CSS_SELECTOR, "figure.chart")),
    message="no chart on the device page has points")
out["device"] = {
    "url": d.current_url,
    "charts": {f.get_attribute("data-title"): int(f.get_attribute("data-points") or 0)
               for f in d.find_elements(By.CSS_SELECTOR, "figure.chart")},
    "canvases": len(d.find_elements(By.CSS_SELECTOR, "figure.chart canvas")),
    "facts": d.find_element(By.CSS_SELECTOR, "#content .cols").text,
    "console": console(),
}
shot("device")
for w in ("24h", "7d"):
    d.find_element(By.XPATH, f"//button[text()='Last {w}']").click()
    WebDriverWait(d, 30).until(lambda x: w in x.current_url)
    WebDriverWait(d, 30).until(
        lambda x: x.find_element(By.XPATH, f"//button[text()='Last {w}']").get_attribute("aria-pressed") == "true")
WebDriverWait(d, 30).until(
    lambda x: x.execute_script(
        "return [...document.querySelectorAll('figure.chart')].some(f => Number(f.dataset.points) > 0)"),
    message="the 7-day charts never drew")
out["device"]["step_7d"] = d.find_element(By.ID, "charts").get_attribute("data-step")
out["device"]["console_windows"] = console()

if req.get("json_device"):
    go(f"{hub}/ui/devices/{req['json_device']}")
    ready("device")
    out["json_device"] = {
        "facts": d.find_element(By.CSS_SELECTOR, "#content .cols").text,
        "charts": {f.get_attribute("data-title"): int(f.get_attribute("data-points") or 0)
                   for f in d.find_elements(By.CSS_SELECTOR, "figure.chart")},
        "console": console(),
    }

# Jobs: run one from the page; its run page follows the log until the text appears.
go(hub + "/ui/jobs")
ready("jobs")
out["jobs"] = {"jobs": d.find_element(By.CSS_SELECTOR, "#content table").text, "console": console()}
shot("jobs")
collect()
click(f"//button[@data-run='{req['job']}']")
WebDriverWait(d, 30).until(lambda x: "/ui/runs/" in x.current_url, message="Run now did not open the run")
ready("run")
try:
    WebDriverWait(d, 60).until(lambda x: req["log_text"] in x.find_element(By.ID, "log").text)
    WebDriverWait(d, 60).until(lambda x: x.find_element(By.ID, "log").get_attribute("data-state") == "done")
except TimeoutException:
    pass
downloaded = None
if req.get("shots"):
    # The artifact, downloaded through the page (with the token) into a folder of our own.
    into = os.path.join(req["shots"], "downloads")
    os.makedirs(into, exist_ok=True)
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": into})
    target = os.path.join(into, "model.txt")
    if os.path.exists(target):
        os.remove(target)
    d.find_element(By.XPATH, "//ul[@id='artifacts']//button[text()='model.txt']").click()
    for _ in range(100):
        if os.path.exists(target):
            with open(target) as f:
                downloaded = f.read()
            if downloaded:
                break
        time.sleep(0.1)
out["run"] = {
    "downloaded": downloaded,
    "url": d.current_url,
    "log": d.find_element(By.ID, "log").text,
    "facts": d.find_element(By.CSS_SELECTOR, "#content dl").text,
    "artifacts": d.find_element(By.ID, "artifacts").text,
    "console": console(),
}
shot("run")
go(hub + "/ui/jobs")
ready("jobs")
WebDriverWait(d, 10).until(lambda x: "succeeded" in x.find_element(By.ID, "content").text)
shot("jobs")  # again, with the run in it

# Models.
go(hub + "/ui/models")
ready("models")
out["models"] = {"text": d.find_element(By.ID, "content").text,
                 "registry": d.find_element(By.ID, "registry").text,
                 "ledger": d.find_element(By.XPATH, "//table[caption='Provenance ledger']").text,
                 "console": console()}
shot("models")

# Dark: the user's preference is followed.
d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
go(hub + "/")
ready("fleet")
out["dark_background"] = d.execute_script("return getComputedStyle(document.body).backgroundColor")
shot("fleet-dark")
go(f"{hub}/ui/devices/{req['chart_device']}")
ready("device")
shot("device-dark")
d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
out["light_background"] = d.execute_script(
    "return getComputedStyle(document.body).backgroundColor")

# A phone: nothing wider than the screen.
d.set_window_size(390, 844)
phone = {}
for name, path, page in (("fleet", "/", "fleet"), ("device", f"/ui/devices/{req['chart_device']}", "device"),
                         ("jobs", "/ui/jobs", "jobs")):
    go(hub + path)
    ready(page)
    time.sleep(0.5)
    phone[name] = d.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    shot(f"{name}-phone")
out["phone"] = phone
collect()
out["phone_console"] = console()
d.quit()

# A viewer sees the jobs but is offered no button that would be refused.
d = browser()
wait = WebDriverWait(d, 30)
go(hub + "/ui/jobs")
sign_in(req["viewer"])
console()
go(hub + "/ui/jobs")
ready("jobs")
out["viewer"] = {
    "who": d.find_element(By.ID, "who").text,
    "run_buttons": len(d.find_elements(By.CSS_SELECTOR, "button[data-run]")),
    "jobs": d.find_element(By.CSS_SELECTOR, "#content table").text,
    "console": console(),
}
collect()
out["requests"] = sorted(requested)
d.quit()
print(json.dumps(out))
