"""The dashboard in a real browser (Playwright driving Debian's headless Chromium)
against a real 2-node cluster started with an API key: the key is asked for and a
wrong one is an error, the cluster appears with its link and its split instance,
the page fits a phone, a chat streams tokens with its timings and keeps the
conversation, Stop cancels through the node (whose in-flight count returns to 0),
a hub model placed on a chosen node shows its download's progress, comes up
and is deleted from the page, and a killed node leaves the page, its instance
changes and the answer it cut ends with an error.

One browser and one cluster for the whole module; the tests run in order. The
screenshots go to pytest's temporary directory (printed at the end of the run:
`pytest -s`), not into the repository."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_hub import FakeHub
from tests.nodeproc import NodeProcess, free_port, start_node

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    if os.environ.get("CI") or os.environ.get("REQUIRE_CHROMIUM"):
        raise RuntimeError("CI must run the browser tests: .ci/run installs chromium")
    pytest.skip("no chromium (apt-get install -y chromium)", allow_module_level=True)

from playwright.sync_api import Browser, Page, Route, expect, sync_playwright  # noqa: E402

SECRET = "dashboard-test-cluster-secret"
KEY = "dashboard-test-key"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 60_000  # ms: a generous bound for a shared 2-core machine


class TwoNodes:
    def __init__(self, model_dir: Path, root: Path, hub: FakeHub) -> None:
        ports = {"a": free_port(), "b": free_port()}
        self.hub = hub
        self.nodes: dict[str, NodeProcess] = {}
        for name, other in (("a", "b"), ("b", "a")):
            # A local hub (tests/fake_hub.py) for the models placed from the page.
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / name / "hf-cache")}
            self.nodes[name] = start_node(
                model_dir,
                root / name,
                "--node-id", name,
                "--listen", f"127.0.0.1:{ports[name]}",
                "--peer", f"127.0.0.1:{ports[other]}",
                "--cluster-secret", SECRET,
                "--no-discovery",
                "--api-key", KEY,
                "--cpu-affinity", "off",
                env=env,
            )  # fmt: skip

    def get(self, name: str, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.get(f"{self.nodes[name].base_url}{path}", headers=headers, timeout=10)

    def wait_split(self, limit: float = 120.0) -> dict[str, Any]:
        """The automatic instance, ready, with a rank on each node."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for instance in self.get("a", "/state").json()["instances"]:
                if instance["state"] == "ready" and len(instance["shards"]) == 2:
                    return instance  # type: ignore[no-any-return]
            time.sleep(0.2)
        raise AssertionError(f"no split instance:\n{self.nodes['a'].log()}")

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.stop()


@pytest.fixture(scope="module")
def cluster(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    with FakeHub() as hub:
        hub.add_model_dir("org/other", demo_model_dir)
        nodes = TwoNodes(demo_model_dir, tmp_path_factory.mktemp("dashboard"), hub)
        try:
            for node in nodes.nodes.values():
                node.wait_healthy(120)
            yield nodes
        finally:
            hub.release()
            nodes.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(
    browser: Browser, cluster: TwoNodes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Page]:
    """One page of a fresh profile (no key stored yet), on node a."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\ndashboard screenshots: {folder}")
    return folder


def test_the_page_asks_for_the_key_and_a_wrong_key_is_an_error(
    page: Page, cluster: TwoNodes, shots: Path
) -> None:
    # A client that does not ask for HTML still gets the heartbeat.
    root = httpx.get(f"{cluster.nodes['a'].base_url}/", timeout=10)
    assert root.status_code == 200 and root.text == "exo-trio is running\n"
    page.goto(cluster.nodes["a"].base_url + "/")
    banner = page.locator("#error")
    expect(banner).to_contain_text("needs an API key", timeout=WAIT)
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button")
    expect(banner).to_contain_text("refused this API key", timeout=WAIT)
    expect(banner).to_contain_text("invalid API key")
    expect(page.locator("#key-form")).to_be_visible()
    page.screenshot(path=shots / "wrong-key.png")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=WAIT)
    expect(banner).to_be_hidden()
    assert page.evaluate("localStorage.getItem('exo-trio.api-key')") == KEY


def test_the_cluster_appears_with_its_link_and_split_instance(
    page: Page, cluster: TwoNodes, shots: Path
) -> None:
    instance = cluster.wait_split()
    for name in ("a", "b"):
        expect(page.locator(f"[data-node={name}]")).to_be_visible(timeout=WAIT)
    expect(page.locator("[data-node=a]")).to_contain_text("leader")
    expect(page.locator("[data-node=a]")).to_contain_text("used of")
    link = page.locator('[data-link="a|b"]')
    expect(link).to_have_attribute("data-up", "yes", timeout=WAIT)
    expect(link).to_contain_text("loopback")
    expect(link).to_contain_text(" ms", timeout=WAIT)  # its measured round trip
    card = page.locator(f'[data-instance="{instance["id"]}"]')
    expect(card).to_have_attribute("data-state", "ready", timeout=WAIT)
    expect(card).to_contain_text("pipeline across 2 nodes")
    for shard in instance["shards"]:
        part = card.locator(f'[data-shard="{shard["node_id"]}"]')
        expect(part).to_contain_text(f"layers {shard['start_layer']}\u2013{shard['end_layer'] - 1}")
        expect(part).to_contain_text("ready", timeout=WAIT)
    page.screenshot(path=shots / "cluster.png", full_page=True)


def test_the_page_fits_a_phone_and_keeps_the_key(
    browser: Browser, cluster: TwoNodes, shots: Path
) -> None:
    """A phone's screen: one column, nothing wider than the screen. The key is
    already in this browser's storage, so the page goes live without asking."""
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    context.add_init_script(f"localStorage.setItem('exo-trio.api-key', {json.dumps(KEY)})")
    phone = context.new_page()
    errors: list[str] = []
    phone.on("pageerror", lambda error: errors.append(str(error)))
    try:
        phone.goto(cluster.nodes["a"].base_url + "/")
        expect(phone.locator("#connection")).to_have_attribute("data-state", "live", timeout=WAIT)
        expect(phone.locator("#key-form")).to_be_hidden()
        expect(phone.locator("[data-node=b]")).to_be_visible(timeout=WAIT)
        expect(phone.locator(".card.instance").first).to_be_visible(timeout=WAIT)
        layout = phone.evaluate(
            """() => ({
                page: document.documentElement.scrollWidth,
                screen: window.innerWidth,
                lefts: [...document.querySelectorAll("main > section")].map(
                    (s) => Math.round(s.getBoundingClientRect().left)),
            })"""
        )
        assert layout["page"] <= layout["screen"], layout  # no sideways scrolling
        assert len(set(layout["lefts"])) == 1, layout  # the sections in one column
        phone.screenshot(path=shots / "phone.png", full_page=True)
    finally:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def test_a_chat_streams_tokens_with_its_timings_and_keeps_the_conversation(
    page: Page, shots: Path
) -> None:
    expect(page.locator("#chat-model")).to_have_value("demo", timeout=WAIT)
    page.fill("#max-tokens", "40")
    page.fill("#chat-input", "Say something.")
    page.click("#send")
    answer = page.locator(".turn.assistant").nth(0)
    expect(answer).to_have_attribute("data-state", "done", timeout=WAIT)
    expect(answer.locator(".stats")).to_contain_text("first token")
    expect(answer.locator(".stats")).to_contain_text("tokens/s")
    expect(answer.locator(".stats")).to_contain_text("40 tokens")
    first_reply = answer.locator(".text").inner_text()
    assert first_reply.strip()
    # The second turn sends the whole conversation.
    page.fill("#chat-input", "And then?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    messages = sent.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == first_reply
    expect(page.locator(".turn.assistant").nth(1)).to_have_attribute(
        "data-state", "done", timeout=WAIT
    )


def no_early_end(page: Page) -> None:
    """The demo model may sample EOS at any step: the long answers below must run
    until stopped, so their requests get the node's `ignore_eos` extension."""

    def extend(route: Route) -> None:
        body = route.request.post_data_json
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", extend)


def test_stop_cancels_through_the_node_and_in_flight_returns_to_zero(
    page: Page, cluster: TwoNodes, shots: Path
) -> None:
    no_early_end(page)
    page.click("#chat-clear")
    page.fill("#max-tokens", "1500")
    page.fill("#chat-input", "Go on for a long time.")
    page.click("#send")
    answer = page.locator(".turn.assistant").last
    expect(answer).to_have_attribute("data-state", "streaming")
    page.wait_for_function(
        "document.querySelector('.turn.assistant:last-child .text').textContent.length > 20",
        timeout=WAIT,
    )
    expect(page.locator("[data-metric=in_flight] dd")).to_have_text("1", timeout=WAIT)
    with page.expect_request("**/v1/cancel/**") as cancel:
        page.click("#stop")
    assert cancel.value.method == "POST"
    expect(answer).to_have_attribute("data-state", "stopped", timeout=WAIT)
    expect(answer.locator(".stats")).to_contain_text("stopped")
    tokens = int(answer.get_attribute("data-tokens") or 0)
    assert 0 < tokens < 1500
    expect(page.locator("[data-metric=in_flight] dd")).to_have_text("0", timeout=WAIT)
    metrics = cluster.get("a", "/metrics").text
    assert "exo_trio_requests_in_flight 0.0" in metrics
    page.screenshot(path=shots / "chat.png", full_page=True)


def test_a_hub_model_placed_on_a_chosen_node_downloads_then_is_deleted(
    page: Page, cluster: TwoNodes, shots: Path
) -> None:
    """Placed from the page on node b, from the hub: its weights stall on the hub
    after 12 of their 16 MiB until released, so the page shows the download's
    progress; then it comes up on b alone, and its card's button deletes it."""
    split = cluster.wait_split()
    form = page.locator("#place-form")
    form.locator("input[name=model]").fill("org/other")
    form.locator("select[name=sharding]").select_option("pipeline")
    form.locator("input[name=node][value=b]").check()
    cluster.hub.hold_after("model.safetensors", 12_000_000)
    try:
        with page.expect_response("**/v1/instances") as placed:
            form.get_by_role("button", name="Place").click()
        assert placed.value.status == 201, placed.value.text()
        new_id = placed.value.json()["id"]
        expect(page.locator("#place-status")).to_contain_text(new_id)
        card = page.locator(f'[data-instance="{new_id}"]')
        expect(card).to_have_attribute("data-state", "downloading", timeout=WAIT)
        expect(card.locator("progress")).to_be_visible(timeout=WAIT)
        expect(card).to_contain_text(" MiB of ", timeout=WAIT)
        page.screenshot(path=shots / "downloading.png", full_page=True)
    finally:
        cluster.hub.release()
    expect(card).to_have_attribute("data-state", "ready", timeout=WAIT)
    expect(card).to_contain_text("pipeline across 1 node")
    expect(card.locator("[data-shard=b]")).to_contain_text("ready")
    expect(card.locator("progress")).to_have_count(0)
    expect(page.locator(f'[data-instance-metrics="{new_id}"]')).to_be_visible()
    expect(page.locator("#chat-model option[value='org/other']")).to_have_count(1)
    page.screenshot(path=shots / "placed.png", full_page=True)
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete instance …?"
    with page.expect_request("**/v1/instances/**") as deleted:
        card.get_by_role("button", name="Delete instance").click()
    assert deleted.value.method == "DELETE"
    expect(card).to_have_count(0, timeout=WAIT)
    expect(page.locator("#place-status")).to_contain_text(f"deleted {new_id}")
    expect(page.locator("#chat-model option[value='org/other']")).to_have_count(0)
    # The split instance is untouched, and still the chat's model.
    expect(page.locator(f'[data-instance="{split["id"]}"]')).to_have_attribute(
        "data-state", "ready"
    )
    expect(page.locator("#chat-model")).to_have_value("demo")
    form.locator("input[name=node][value=b]").uncheck()


def test_a_killed_node_leaves_the_page_and_its_instance_changes(
    page: Page, cluster: TwoNodes, shots: Path
) -> None:
    instance = cluster.wait_split()
    card = page.locator(f'[data-instance="{instance["id"]}"]')
    expect(card).to_have_attribute("data-state", "ready", timeout=WAIT)
    # An answer in flight through the split instance when its rank 1 dies.
    page.click("#chat-clear")
    page.fill("#chat-input", "Keep talking.")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.turn.assistant:last-child .text').textContent.length > 20",
        timeout=WAIT,
    )
    cluster.nodes["b"].process.kill()
    answer = page.locator(".turn.assistant").last
    expect(answer).to_have_attribute("data-state", "error", timeout=WAIT)
    expect(answer.locator(".error-text")).to_contain_text("ended the answer with an error")
    expect(page.locator("[data-node=b]")).to_have_count(0, timeout=WAIT)
    expect(page.locator('[data-link="a|b"]')).to_have_count(0)
    # The split instance failed and went away; a instance of a alone replaces it.
    expect(card).to_have_count(0, timeout=WAIT)
    expect(page.locator("[data-node=a]")).to_be_visible()
    page.screenshot(path=shots / "node-lost.png", full_page=True)
