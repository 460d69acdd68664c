"""The gateway's pages in a real browser (Debian's Chromium, headless, driven by Selenium through
/usr/bin/chromedriver), served by real nginx in front of coglet running predict.py on tiny weights:
/docs/ lists the inputs of this server's own schema and runs a request; / generates an image of the
requested size and shows its seed, generates with a ControlNet chosen under "Control" (tiny control models baked,
devtools/synthetic_control.add_control), and shows four 2048x2048 images (tests/fixtures/large_output_predictor.py);
a wrong key is reported. Every test fails on any Content-Security-Policy violation in the browser's
console: the pages work under the gateway's strict policy. The screenshots are kept under build/test-artifacts/."""

import re
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.cog_server import REPO_ROOT, CogServer
from devtools.gateway import Gateway, nginx_available
from devtools.synthetic_control import add_control

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SWAGGER_UI = REPO_ROOT / "gateway/node_modules/swagger-ui-dist/swagger-ui-bundle.js"
ARTIFACTS = REPO_ROOT / "build/test-artifacts"
KEY = "page-key-0123456789"
READY_TIMEOUT_S = 300
PREDICT_TIMEOUT_S = 300
PAGE_TIMEOUT_S = 30
# Not square, so a swapped width and height would show.
WIDTH, HEIGHT, SEED = 192, 128, 4242

pytestmark = [
    pytest.mark.gateway,
    pytest.mark.skipif(not nginx_available(), reason="nginx (with libnginx-mod-http-js) and envsubst not installed"),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="Chromium and chromedriver (Debian packages chromium, chromium-driver) not installed",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def gateway(tiny_weights, tmp_path_factory):
    assert SWAGGER_UI.exists(), "Swagger UI is not installed: run `npm ci --ignore-scripts --prefix gateway`"
    scratch = tmp_path_factory.mktemp("pages")
    weights = Path(shutil.copytree(tiny_weights, scratch / "weights"))
    add_control(weights)
    env = {"SDXL_WEIGHTS_DIR": str(weights), "SDXL_OUTPUT_DIR": str(scratch / "outputs")}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as cog:
        with Gateway(cog.port, env={"SDXL_API_KEYS": KEY}) as running:
            yield running


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory):
    predictor = f"{REPO_ROOT / 'tests/fixtures/slow_predictor.py'}:Predictor"
    with CogServer(predictor, cwd=tmp_path_factory.mktemp("slow")) as cog:
        with Gateway(cog.port, env={"SDXL_API_KEYS": KEY}) as running:
            yield running


@pytest.fixture(scope="module")
def large_gateway(tmp_path_factory):
    predictor = f"{REPO_ROOT / 'tests/fixtures/large_output_predictor.py'}:Predictor"
    with CogServer(predictor, cwd=tmp_path_factory.mktemp("large")) as cog:
        with Gateway(cog.port, env={"SDXL_API_KEYS": KEY}) as running:
            yield running


def csp_violations(driver) -> list[str]:
    """What the browser's console says the page's Content-Security-Policy blocked (the log empties as it is read)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]
    ]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The console, CSP reports among it, for csp_violations().
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1400")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
        assert not csp_violations(driver), "the page broke its Content-Security-Policy"
    finally:
        driver.quit()


def wait(driver, timeout=PAGE_TIMEOUT_S) -> WebDriverWait:
    return WebDriverWait(driver, timeout)


def use_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()


def set_field(driver, name: str, value) -> None:
    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(str(value))


def test_docs_list_the_inputs_of_this_servers_schema(gateway, browser):
    browser.get(f"{gateway.url}/docs/")
    use_key(browser, KEY)
    wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, '.model-container[data-name="Input"]')))
    # Coglet's /shutdown is not served by the gateway, so the reference does not offer it.
    operations = {
        (
            e.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
            e.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text,
        )
        for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary")
    }
    assert ("POST", "/predictions") in operations and ("GET", "/predictions/{prediction_id}") in operations
    assert not [op for op in operations if op[1] == "/shutdown"]
    browser.find_element(By.CSS_SELECTOR, '.model-container[data-name="Input"] .model-box-control').click()
    # Swagger UI renders the expanded model's properties after the click returns ("Input{ }" until then).
    input_model = (By.CSS_SELECTOR, '.model-container[data-name="Input"]')
    wait(browser).until(lambda driver: "prompt" in driver.find_element(*input_model).text)
    model = browser.find_element(*input_model).text
    for name in ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "seed", "image", "mask"):
        assert name in model, f"{name} not listed in the Input model:\n{model}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs.png"))
    print(f"\ndocs screenshot: {ARTIFACTS / 'docs.png'}")

    # A request from the reference itself, with the key: GET /health-check, whole for a key.
    (block,) = [
        b
        for b in browser.find_elements(By.CSS_SELECTOR, ".opblock.opblock-get")
        if b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text == "/health-check"
    ]
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(browser).until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    live = ".live-responses-table tbody"
    wait(browser).until(lambda d: block.find_elements(By.CSS_SELECTOR, f"{live} .response-col_status"))
    assert block.find_element(By.CSS_SELECTOR, f"{live} .response-col_status").text.startswith("200")
    assert '"setup"' in block.find_element(By.CSS_SELECTOR, f"{live} .response-col_description").text


def test_playground_generates_an_image_of_the_requested_size_and_shows_its_seed(gateway, browser):
    browser.get(gateway.url + "/")
    use_key(browser, KEY)
    wait(browser).until(ec.element_to_be_clickable((By.ID, "generate")))
    set_field(browser, "prompt", "a lighthouse at dusk")
    set_field(browser, "width", WIDTH)
    set_field(browser, "height", HEIGHT)
    set_field(browser, "num_inference_steps", 2)
    set_field(browser, "seed", SEED)
    browser.find_element(By.ID, "generate").click()

    done = (By.CSS_SELECTOR, "#images img"), (By.CSS_SELECTOR, "#message.error")
    wait(browser, PREDICT_TIMEOUT_S).until(ec.any_of(*(ec.presence_of_element_located(d) for d in done)))
    assert not browser.find_elements(*done[1]), browser.find_element(By.ID, "message").text + gateway.log()[-3000:]
    image = browser.find_element(*done[0])
    wait(browser).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [WIDTH, HEIGHT]
    assert browser.find_element(By.ID, "seeds").text == str(SEED)
    assert browser.find_element(By.ID, "message").text.startswith("Done in")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "playground.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(screenshot))
    print(f"\nplayground screenshot: {screenshot}")


def test_playground_generates_with_a_control_chosen_under_control(gateway, browser, tmp_path):
    photo = tmp_path / "house.png"
    pixels = np.full((128, 128, 3), 30, np.uint8)
    pixels[24:104, 24:104] = (220, 200, 40)
    Image.fromarray(pixels).save(photo)
    browser.get(gateway.url + "/")
    use_key(browser, KEY)
    wait(browser).until(ec.element_to_be_clickable((By.ID, "generate")))
    set_field(browser, "prompt", "a glass house")
    set_field(browser, "width", 128)
    set_field(browser, "height", 128)
    set_field(browser, "num_inference_steps", 2)
    set_field(browser, "seed", SEED)
    control = browser.find_element(By.ID, "control")
    assert not control.get_attribute("open")  # collapsed until asked for
    # A slot's inputs wait for its type.
    assert not browser.find_element(By.NAME, "controlnet_1_image").is_enabled()
    control.find_element(By.TAG_NAME, "summary").click()
    Select(browser.find_element(By.NAME, "controlnet_1")).select_by_value("canny")
    assert browser.find_element(By.NAME, "controlnet_1_image").is_enabled()
    assert not browser.find_element(By.NAME, "controlnet_2_image").is_enabled()
    browser.find_element(By.NAME, "controlnet_1_image").send_keys(str(photo))
    log_before = len(gateway.log())
    browser.find_element(By.ID, "generate").click()

    done = (By.CSS_SELECTOR, "#images img"), (By.CSS_SELECTOR, "#message.error")
    wait(browser, PREDICT_TIMEOUT_S).until(ec.any_of(*(ec.presence_of_element_located(d) for d in done)))
    assert not browser.find_elements(*done[1]), browser.find_element(By.ID, "message").text + gateway.log()[-3000:]
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "message"), "Done in"))
    assert "control_preprocess_time" in browser.find_element(By.ID, "details").text  # the canny map was made

    # What the page sent, as the image records it: the prediction it followed, found in the gateway's access log.
    (prediction_id,) = set(re.findall(r'"GET /predictions/([0-9a-f]{32})"', gateway.log()[log_before:]))
    bearer = {"Authorization": f"Bearer {KEY}"}
    state = requests.get(f"{gateway.url}/predictions/{prediction_id}", headers=bearer, timeout=10).json()
    (output,) = state["output"]
    image = Image.open(BytesIO(requests.get(f"{gateway.url}{output}", headers=bearer, timeout=10).content))
    assert image.size == (128, 128)
    parameters = image.info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: canny, Weight: 0.75' in parameters
    assert "ControlNet 1:" not in parameters  # the slots left at none sent nothing

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "playground-control.png"
    browser.execute_script("arguments[0].scrollIntoView()", control)
    browser.save_screenshot(str(screenshot))
    print(f"\nplayground control screenshot: {screenshot}")


def test_playground_shows_four_2048_images_from_the_gateways_store(large_gateway, browser):
    browser.get(large_gateway.url + "/")
    use_key(browser, KEY)
    wait(browser).until(ec.element_to_be_clickable((By.ID, "generate")))
    browser.find_element(By.CSS_SELECTOR, "#more summary").click()  # inputs outside MAIN_INPUTS
    set_field(browser, "size", 2048)
    set_field(browser, "count", 4)
    browser.find_element(By.ID, "generate").click()
    wait(browser, PREDICT_TIMEOUT_S).until(ec.text_to_be_present_in_element((By.ID, "message"), "Done in"))
    images = browser.find_elements(By.CSS_SELECTOR, "#images img")
    loaded = "return arguments[0].complete && [arguments[0].naturalWidth, arguments[0].naturalHeight]"
    sizes = [wait(browser).until(lambda d, image=image: d.execute_script(loaded, image)) for image in images]
    assert sizes == [[2048, 2048]] * 4
    # Fetched with the key and shown from blob: URLs (the outputs are the key's alone).
    assert all(image.get_attribute("src").startswith("blob:") for image in images)


def test_playground_says_when_the_key_is_wrong(gateway, browser):
    browser.get(gateway.url + "/")
    use_key(browser, "not-the-key")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "message"), "API key is missing or wrong"))
    assert "error" in browser.find_element(By.ID, "message").get_attribute("class")
    assert browser.find_element(By.ID, "generate").get_attribute("disabled")


def test_playground_shows_the_denoising_step_while_it_runs(slow_gateway, browser):
    browser.get(slow_gateway.url + "/")
    use_key(browser, KEY)
    wait(browser).until(ec.element_to_be_clickable((By.ID, "generate")))
    browser.find_element(By.CSS_SELECTOR, "#more summary").click()  # inputs outside MAIN_INPUTS
    set_field(browser, "sleep_s", 6)
    set_field(browser, "steps", 6)
    browser.find_element(By.ID, "generate").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "message"), "base step"))
    progress = browser.find_element(By.ID, "progress")
    assert progress.is_displayed() and progress.get_attribute("max") == "6"
    assert 1 <= int(progress.get_attribute("value")) < 6
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "message"), "Done in"))
    assert not progress.is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#images img")
