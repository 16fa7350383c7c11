"""lens_grid.py: the per-prompt layer x position grid equals the lens's top tokens (a hand-built model whose
answers are known, and a random one against a plain decode), its HTML page is self-contained and carries the
data, hovering a cell in a real headless Chromium shows its top-5 (skipped where chromium is not installed),
its PNG is written; analyze.py --prompt and --lens=both end to end."""

import base64
import glob
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from html.parser import HTMLParser

import pytest
import torch

import analyze
from nanoshift.common import InputError
from nanoshift.lens_grid import cell_class, grid_html, lens_grid, plot_grid, write_grid_html
from nanoshift.lm import OurGPT
from nanoshift.tuned_lens import Translators
from conftest import tiny_gpt, write_checkpoint
from model import GPT, GPTConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
C = 32  # the hand-built model: vocabulary = width = 32


def one_hot_model():
    """A 2-block GPT whose state is 4 * e_t at every layer (one-hot embeddings, no positions, blocks that add
    nothing), so the logit lens's top-1 is the input token everywhere, with a probability known by hand."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=C, block_size=16, vocab_size=C)).eval()
    with torch.no_grad():
        model.lm_head.weight.copy_(4 * torch.eye(C))  # tied: also the token embedding
        model.transformer.wpe.weight.zero_()
        for name, p in model.named_parameters():
            if ".c_proj." in name:
                p.zero_()
    return OurGPT(model, "one-hot")


def shift_translators(lm):
    """Translators with h + A h = P h, P the cyclic shift e_t -> e_t+1: under this tuned lens the one-hot model's
    state at token t decodes to t + 1 (the final norm commutes with a permutation)."""
    translators = Translators.for_model(lm)
    shift = torch.roll(torch.eye(C), 1, dims=0)  # shift @ e_t = e_(t+1 mod C)
    with torch.no_grad():
        for t in translators.resid:
            t.weight.copy_(shift - torch.eye(C))
    return translators


def test_grid_of_a_hand_checked_prompt():
    lm = one_hot_model()
    prompt = [3, 4, 5, 9, 9]  # GPT-2 ids of "$", "%", "&", "*", "*": targets 4, 5, 9, 9, (none)
    grid = lens_grid(lm, prompt)
    assert [row["layer"] for row in grid["rows"]] == [0.0, 1.0, 2.0]
    assert grid["token_text"] == ["$", "%", "&", "*", "*"] and grid["targets"] == [4, 5, 9, 9, None]
    # by hand: LN(4 e_t) is 3.875 / s at t and -0.125 / s elsewhere (s^2 = 15.5 / 32 + eps), times 4
    s = math.sqrt(15.5 / 32 + 1e-5)
    gap = 4 * 4 / s
    p_top = 1 / (1 + (C - 1) * math.exp(-gap))
    for r in range(3):
        assert [ids[0] for ids in grid["top_ids"][r]] == prompt
        assert grid["classes"][r] == ["input", "input", "input", "both", "input"]
        assert all(p[0] == pytest.approx(p_top, rel=1e-6) for p in grid["top_probs"][r])
        assert all(t[0] == text for t, text in zip(grid["top_text"][r], grid["token_text"]))
    tuned = lens_grid(lm, prompt, shift_translators(lm))
    assert tuned["lens"] == "tuned"
    for r in range(2):  # translated states: t + 1
        assert [ids[0] for ids in tuned["top_ids"][r]] == [4, 5, 6, 10, 10]
        assert tuned["classes"][r] == ["target", "target", "neither", "neither", "neither"]
    assert tuned["top_ids"][2] == grid["top_ids"][2]  # the last state has no translator: the model's output


def test_cell_classes():
    assert cell_class(7, 7, 8) == "input" and cell_class(8, 7, 8) == "target"
    assert cell_class(7, 7, 7) == "both" and cell_class(9, 7, 8) == "neither" and cell_class(7, 6, None) == "neither"


@pytest.mark.parametrize("tuned", [False, True])
def test_grid_equals_a_plain_decode_of_every_state(tuned):
    torch.manual_seed(0)
    lm = OurGPT(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40)).eval(), "random")
    translators = None
    if tuned:
        translators = Translators.for_model(lm, mid=True)
        with torch.no_grad():
            for p in translators.parameters():
                p.copy_(0.3 * torch.randn_like(p))
    prompt = [5, 17, 2, 39, 11, 11, 0]
    grid = lens_grid(lm, prompt, translators, mid=True, top=3)
    assert [(row["kind"], row["layer"]) for row in grid["rows"]] == [
        ("resid", 0.0), ("mid", 0.5), ("resid", 1.0), ("mid", 1.5), ("resid", 2.0)]
    with torch.no_grad():
        resid, mids = lm.hidden_states(torch.tensor([prompt]), mid=True)
        states = {0.0: (resid[0], 0), 0.5: (mids[0], 3), 1.0: (resid[1], 1), 1.5: (mids[1], 4), 2.0: (resid[2], 2)}
        for r, row in enumerate(grid["rows"]):
            h, index = states[row["layer"]]
            h = h[0] if translators is None else translators(h[0], index)
            probs, ids = torch.softmax(lm.decode(h), -1).topk(3)
            assert grid["top_ids"][r] == ids.tolist()
            assert torch.allclose(torch.tensor(grid["top_probs"][r]), probs)


def test_bad_prompts_are_input_errors():
    lm = one_hot_model()
    with pytest.raises(InputError, match="no tokens"):
        lens_grid(lm, [])
    with pytest.raises(InputError, match="longer than one-hot's block size 16"):
        lens_grid(lm, [1] * 17)
    with pytest.raises(InputError, match="outside one-hot's vocabulary"):
        lens_grid(lm, [1, C])


class _Page(HTMLParser):
    """What a browser would load: tags with src/href, the JSON data block, cell titles."""

    def __init__(self):
        super().__init__()
        self.links, self.data, self.titles, self._in_data = [], None, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        self._in_data = attrs.get("id") == "lens-data"
        if "cell" in attrs.get("class", ""):
            self.titles.append(attrs["title"])

    def handle_data(self, data):
        if self._in_data:
            self.data = json.loads(data)
            self._in_data = False


def test_html_is_self_contained_and_carries_the_grid(tmp_path):
    lm = one_hot_model()
    prompt = [27, 5, 29, 1]  # "<", "&", ">", '"': what HTML must escape
    grid = lens_grid(lm, prompt, shift_translators(lm))
    path = write_grid_html(grid, str(tmp_path / "grid.html"))
    page = open(path, encoding="utf-8").read()
    assert page == grid_html(grid)
    assert not re.search(r"https?:|//[\w.]|<link|@import|url\(", page)  # nothing fetched from anywhere
    parsed = _Page()
    parsed.feed(page)
    assert parsed.links == [] and parsed.data is not None
    for key in ("tokens", "top_ids", "top_probs", "top_text", "classes", "targets"):
        assert parsed.data[key] == grid[key]
    assert parsed.data["token_text"] == ["<", "&", ">", '"']
    assert len(parsed.titles) == 3 * len(prompt)  # one cell per state and position, each with its top-5 in the title
    # rows top-down as in the PNG: first the output (the input token, p ~ 1), then a translated state (t + 1)
    assert parsed.titles[0].splitlines()[0] == '1. "<" 100.0%'
    assert parsed.titles[len(prompt)].splitlines()[0] == '1. "=" 100.0%'
    assert "&lt;" in page and "<td" in page and '>"<"' not in page


def test_png_of_the_grid(tmp_path):
    lm = one_hot_model()
    fig = plot_grid(lens_grid(lm, [3, 4, 5, 9, 9]))
    path = analyze.save_figure(fig, str(tmp_path / "grid.png"))
    assert open(path, "rb").read(8) == PNG_SIGNATURE
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["$", "%", "&", "*", "*"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["$", "%", "&", "*", "*"] * 3)  # top-1 in every cell


def test_analyze_prompt_and_both_lenses_end_to_end(tmp_path, prose_shards, capsys):
    run = write_checkpoint(tiny_gpt(0), tmp_path / "run")
    shards = os.path.join(prose_shards, "*val*.bin")
    common = ["--ckpt", run, "--shards", shards, "--seq_len=16", "--lens_steps=2", "--lens_tokens_per_step=32",
              "--progress=False", "--out_dir", str(tmp_path / "a")]
    analyze.main(common + ["--prompt", "The cat sat on the mat", "--lens=both"])
    out = capsys.readouterr().out
    assert "tuned lens of run: trained" in out and os.path.isfile(os.path.join(run, "ckpt.tuned_lens.pt"))
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "a" / "grid_*")))
    assert names == ["grid_run_logit.html", "grid_run_logit.png", "grid_run_tuned.html", "grid_run_tuned.png"]
    assert not os.path.exists(tmp_path / "a" / "metrics.json")  # --prompt: the grid only
    analyze.main(common + ["--lens=both", "--num_sequences=3"])
    out = capsys.readouterr().out
    assert "tuned lens of run: loaded" in out  # the saved translators are reused
    data = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [(m["label"], m["lens"]) for m in data["models"]] == [("run (logit lens)", "logit"), ("run (tuned lens)", "tuned")]
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",lens") and {r.rsplit(",", 1)[1] for r in rows[1:]} == {"logit", "tuned"}
    assert open(tmp_path / "a" / "lens_overlay_run.png", "rb").read(8) == PNG_SIGNATURE
    with pytest.raises(SystemExit) as e:
        analyze.main(common + ["--lens=tuned-ish"])
    assert e.value.code == 2 and "lens must be 'logit', 'tuned' or 'both'" in capsys.readouterr().err


class _DevTools:
    """The smallest client of Chromium's DevTools protocol: one page's websocket (RFC 6455, text frames), stdlib only."""

    def __init__(self, ws_url):
        host, path = ws_url[len("ws://"):].split("/", 1)
        name, port = host.rsplit(":", 1)
        self.sock = socket.create_connection((name, int(port)), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _read(self, n):
        while len(self.buf) < n:
            self.buf += self.sock.recv(65536)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def call(self, method, **params):
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        size = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + struct.pack(">H", len(data))
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            n = self._read(2)[1] & 0x7F
            n = struct.unpack(">H", self._read(2))[0] if n == 126 else struct.unpack(">Q", self._read(8))[0] if n == 127 else n
            message = json.loads(self._read(n))
            if message.get("id") == self.next_id:
                return message.get("result")

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium to check the page in (apt-get install chromium)")
def test_hovering_a_cell_in_a_real_browser_shows_its_top_tokens(tmp_path):
    """Headless Chromium loads the page from disk (it could not fetch anything anyway: no network); a mouse
    moved over a cell through the DevTools protocol's input events shows that cell's top-5, and moving away
    hides them."""
    lm = one_hot_model()
    grid = lens_grid(lm, [27, 5, 29, 1], shift_translators(lm))
    path = write_grid_html(grid, str(tmp_path / "grid.html"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,600", f"file://{path}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                assert time.time() < deadline, "chromium did not start"
                time.sleep(0.2)
        page = _DevTools(ws_url)
        while page.evaluate("!!document.getElementById('lens-data') && document.readyState") != "complete":
            assert time.time() < deadline, "the page did not load"  # (the target starts as about:blank)
            time.sleep(0.1)
        tip = "getComputedStyle(document.getElementById('tip')).display"
        assert page.evaluate(tip) == "none"
        x, y = page.evaluate("(function () { var b = document.querySelector('td.cell[data-row=\"0\"][data-col=\"0\"]')"
                             ".getBoundingClientRect(); return [b.left + b.width / 2, b.top + b.height / 2]; })()")
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        assert page.evaluate(tip) == "block"
        text = page.evaluate("document.getElementById('tip').innerText").splitlines()
        # row 0 (the embeddings, translated by the shift): input "<" (27), target "&" (5), top-1 "=" (28)
        assert text[:3] == ["layer 0, position 0", 'input "<", target "&"', '1.\t"="\t100.0%']
        assert len(text) == 2 + 5
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=2, y=2)
        assert page.evaluate(tip) == "none"
    finally:
        browser.terminate()
        browser.wait(timeout=20)
