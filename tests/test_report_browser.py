"""report.html renders in headless Chromium and shows every plot (images decoded, visible, sized)."""
import shutil

import pytest

from leanformer.cli import main
from leanformer.metrics.schema import LAYER_METRICS, TRANSITION_METRICS
from leanformer.text import default_corpus

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian package chromium; .ci/run installs it)")
def test_report_shows_all_plots_in_chromium(tmp_path, make_tiny_bert, tokenizer):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    model_dir = tmp_path / "tiny"
    blocks = 3
    make_tiny_bert(layers=blocks, vocab_size=tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(default_corpus()[:40]))
    out = tmp_path / "run"
    assert main(["inspect", str(model_dir), "--text", str(text), "--tokens", "600", "--sample-size", "200",
                 "--out", str(out)]) == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                       else route.continue_())  # offline: any external fetch would fail the page
            page.goto((out / "report.html").as_uri())
            images = page.evaluate("""Array.from(document.images).map(i => ({
                alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                shown: i.getBoundingClientRect().width}))""")
            title = page.title()
            rows = page.locator("tbody tr").count()
            headers = page.locator("thead th").all_inner_texts()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert "leanformer inspect" in title
    assert rows == blocks + 1  # h_0 … h_3
    assert headers == ["layer", *(m.label for m in LAYER_METRICS), "block", *(m.label for m in TRANSITION_METRICS)]
    assert len(images) == len(LAYER_METRICS) + len(TRANSITION_METRICS) == 7
    for image in images:
        assert image["complete"] and image["w"] > 300 and image["h"] > 150 and image["shown"] > 200, image
    assert any("Linearity" in i["alt"] for i in images)
