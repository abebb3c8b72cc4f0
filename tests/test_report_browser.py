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
            rows = page.locator("table").first.locator("tbody tr").count()
            headers = page.locator("table").first.locator("thead th").all_inner_texts()
            candidates = page.locator("table.candidates tbody tr").all_inner_texts()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert "leanformer inspect" in title
    assert rows == blocks + 1  # h_0 … h_3
    layer_metrics = LAYER_METRICS[:3]  # an encoder: no logit-lens columns or plots
    assert headers == ["layer", *(m.label for m in layer_metrics), "block", *(m.label for m in TRANSITION_METRICS)]
    assert len(images) == len(layer_metrics) + len(TRANSITION_METRICS) == 7
    assert [c.split()[0] for c in candidates] == ["linearity", "block_influence", "angular"]
    for image in images:
        assert image["complete"] and image["w"] > 300 and image["h"] > 150 and image["shown"] > 200, image
    assert any("Linearity" in i["alt"] for i in images)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian package chromium; .ci/run installs it)")
def test_compare_report_shows_overlays_without_overflow(tmp_path, make_tiny_bert, tokenizer):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    import leanformer as lf
    from leanformer.report import plot_comparison, write_comparison_report

    texts = default_corpus()[:40]
    kwargs = dict(tokens=600, max_length=64, sample_size=200, progress=False)
    base = make_tiny_bert(layers=4, vocab_size=tokenizer.vocab_size)
    base_profile = lf.inspect(base, tokenizer, texts, **kwargs)
    lf.prune_layers(base, 1, by="index", start=2)
    comparison = lf.compare([base_profile, lf.inspect(base, tokenizer, texts, **kwargs)],
                            labels=["base model with a long name", "pruned"])
    plots = plot_comparison(comparison, tmp_path)
    page_path = write_comparison_report(comparison, plots, tmp_path / "report.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                       else route.continue_())
            page.goto(page_path.as_uri())
            images = page.evaluate("""Array.from(document.images).map(i => ({
                complete: i.complete, w: i.naturalWidth, shown: i.getBoundingClientRect().width}))""")
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            changed = page.locator("h2:has-text('What changed') + div tbody tr").count()
        finally:
            browser.close()
    assert len(images) == len(plots) == 7
    assert all(i["complete"] and i["w"] > 300 and i["shown"] > 200 for i in images), images
    assert overflow <= 0  # nothing wider than the window
    assert changed == len(comparison.changes())
