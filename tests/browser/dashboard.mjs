// The dashboard in a real browser (Debian's Chromium, headless, driven by playwright-core):
// sign in with a token, see a sensor's value change after an MQTT publish, publish smoke and see
// the alert appear, acknowledge it and see its state change; save a screenshot.
// Environment: HEARTH_URL, HEARTH_TOKEN, MQTT_PORT, HOUSE, SCREENSHOT, CHROMIUM (optional).
import { execFileSync } from "node:child_process";
import { chromium } from "playwright-core";

const url = process.env.HEARTH_URL;
const token = process.env.HEARTH_TOKEN;
const port = process.env.MQTT_PORT;
const house = process.env.HOUSE;
const step = (what) => console.log("browser: " + what);
const publish = (sensor, payload) =>
  execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", port, "-q", "1",
    "-t", `hearth/${house}/${sensor}`, "-m", JSON.stringify(payload)]);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(20000);
  // The page runs under its Content-Security-Policy: anything it blocks is a failure.
  const violations = [];
  page.on("console", (m) => {
    console.log("console: " + m.text());
    if (m.text().includes("Content Security Policy")) violations.push(m.text());
  });
  page.on("pageerror", (e) => console.log("page error: " + e.message));
  page.on("response", (r) => { if (r.status() >= 400) console.log("http " + r.status() + " " + r.url()); });
  await page.goto(url);
  await page.fill("#token", token);
  await page.click("#login-form button");
  await page.waitForSelector('tr[data-key="living-temp/temperature"]');
  step("signed in, sensor listed");
  await page.waitForSelector("#live:not(.off)");
  // The socket opens before the server has registered the subscription (its `hello` follows).
  await page.waitForTimeout(1000);

  publish("living-temp", { kind: "temperature", value: 23.75, seq: 2 });
  // Locators wait outside the page's world: no eval, which its CSP forbids. The page re-reads
  // over REST every 15 s: waiting at most 8 s makes these steps fail unless the WebSocket
  // pushed the change.
  const PUSHED = { timeout: 8000 };
  await page.locator('tr[data-key="living-temp/temperature"] .value')
    .filter({ hasText: /^23\.75/ }).waitFor(PUSHED);
  step("value changed after an MQTT publish");

  publish("hall-smoke", { kind: "smoke", value: true, seq: 1 });
  await page.waitForSelector('.alert.critical.active[data-sensor="hall-smoke"]', PUSHED);
  await page.waitForSelector("#banner.on", PUSHED);
  step("smoke alert shown");

  await page.click('.alert.critical.active[data-sensor="hall-smoke"] button');
  await page.waitForSelector('.alert.critical.acknowledged[data-sensor="hall-smoke"]');
  step("alert acknowledged");

  // A device announced by Home Assistant discovery, in °F: shown in °C, its availability in words.
  const raw = (topic, payload, retain) => execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", port,
    "-q", "1", ...(retain ? ["-r"] : []), "-t", topic, "-m", payload]);
  raw("homeassistant/sensor/garden/soil_temperature/config", JSON.stringify({
    name: "Soil temperature", "~": "garden", stat_t: "~/soil", dev_cla: "temperature",
    unit_of_meas: "°F", val_tpl: "{{ value_json.t | float }}", avty_t: "~/status",
    dev: { name: "garden", mf: "Acme", mdl: "S1" },
  }), true);
  // The ingest subscribes to a discovered state topic once the config is kept: publish until seen.
  const soil = page.locator('tr[data-key="garden.soil_temperature/temperature"] .value').filter({ hasText: /^22/ });
  for (let i = 0; ; i++) {
    raw("garden/status", "online", true);
    raw("garden/soil", JSON.stringify({ t: 71.6 }), false);
    try { await soil.waitFor({ timeout: 1000 }); break; } catch (e) { if (i >= 8) throw e; }
  }
  await page.locator('tr[data-key="garden/availability"] .value').filter({ hasText: /^online/ }).waitFor(PUSHED);
  // Its model and maker, from the sensors' list (re-read every 15 s).
  await page.locator('tr[data-key="garden.soil_temperature/temperature"]').filter({ hasText: "S1" })
    .waitFor({ timeout: 20000 });
  step("discovered device shown");

  // The pipeline panel fills in (every 2 s).
  await page.locator("#lanes tr").first().waitFor();
  await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  step("screenshot saved");
  if (violations.length) throw new Error("CSP violations: " + violations.join("; "));
  const headers = (await page.request.get(url)).headers();
  if (!headers["content-security-policy"]?.includes("frame-ancestors 'none'")) throw new Error("no CSP header");
  if (headers["x-content-type-options"] !== "nosniff") throw new Error("no nosniff header");
  step("served with its CSP, frame-ancestors 'none' and nosniff");
} finally {
  await browser.close();
}
