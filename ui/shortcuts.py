"""The vote actions, their keyboard shortcuts, and the browser script that binds them.

One table drives the button labels, the element ids and the key bindings, so they cannot
drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefloop_client.api import Choice


@dataclass(frozen=True)
class VoteAction:
    """One vote button.

    Attributes:
        choice: the API's ``choice`` value.
        label: the button text, without the key hint.
        keys: ``KeyboardEvent.key`` values that press the button.
        key_hint: how the keys are shown on the button (the arrow in the label is the other).
    """

    choice: Choice
    label: str
    keys: tuple[str, ...]
    key_hint: str

    @property
    def button_text(self) -> str:
        return f"{self.label}  [{self.key_hint}]"

    @property
    def elem_id(self) -> str:
        return f"prefloop-vote-{self.choice.replace('_', '-')}"


VOTE_ACTIONS: tuple[VoteAction, ...] = (
    VoteAction("left", "← Left", ("1", "ArrowLeft"), "1"),
    VoteAction("right", "Right →", ("2", "ArrowRight"), "2"),
    VoteAction("tie", "↑ Tie", ("3", "ArrowUp"), "3"),
    VoteAction("both_bad", "↓ Both bad", ("4", "ArrowDown"), "4"),
    VoteAction("skip", "Skip", ("5", " "), "5 / Space"),
)


def key_map() -> dict[str, str]:
    """``KeyboardEvent.key`` -> element id of the button it presses."""
    mapping: dict[str, str] = {}
    for action in VOTE_ACTIONS:
        for key in action.keys:
            if key in mapping:
                raise ValueError(f"key {key!r} is bound twice")
            mapping[key] = action.elem_id
    return mapping


#: CSS injected by the page-load script (the mount owner may not pass ``css=``).
PAGE_CSS = """
#prefloop-prompt { font-size: 1.25rem; line-height: 1.5; padding: 0.4rem 0; }
#prefloop-prompt p { font-size: 1.25rem; }
.prefloop-side img { width: 100% !important; height: 100% !important;
  object-fit: contain !important; image-rendering: pixelated; }
.prefloop-pixelated img { image-rendering: pixelated; }
#prefloop-notice p { margin: 0.25rem 0; }
#prefloop-title h2 { white-space: nowrap; }
#prefloop-sign-out { align-self: center; min-width: max-content; }
@media (max-width: 640px) {
  .prefloop-side { height: auto !important; }
  .prefloop-side img { max-height: 42vh; }
}
.prefloop-preload { position: fixed !important; left: 0 !important; top: 0 !important;
  width: 2px !important; height: 2px !important; min-width: 0 !important;
  overflow: hidden !important; opacity: 0 !important; pointer-events: none !important;
  z-index: -1 !important; }
#prefloop-token, #prefloop-latency { display: none !important; }
"""


def page_load_js() -> str:
    """A script for ``Blocks.load(js=...)``: binds the shortcuts once and adds the page CSS.

    Keys are ignored while the focus is in a text field, when a modifier is held, on key
    repeat, and when the button is hidden or disabled (signed out, no pair, admin tab open).
    The focused element is blurred first, so Space never also "clicks" a focused button.
    """
    return f"""
() => {{
  if (window.__prefloopShortcuts) return;
  window.__prefloopShortcuts = true;
  window.__prefloopTrySwap = {TRY_SWAP_JS.strip()};
  const keyToButton = {json.dumps(key_map(), ensure_ascii=False)};
  const style = document.createElement("style");
  style.id = "prefloop-style";
  style.textContent = {json.dumps(PAGE_CSS)};
  document.head.appendChild(style);
  // Gradio renders images with loading="lazy"; the task and preload images must load now.
  const eager = (root) => {{
    root.querySelectorAll(".prefloop-preload img, .prefloop-side img").forEach((img) => {{
      if (img.getAttribute("loading") !== "eager") img.setAttribute("loading", "eager");
    }});
  }};
  eager(document);
  new MutationObserver(() => eager(document)).observe(document.body, {{
    childList: true, subtree: true, attributes: true, attributeFilter: ["src", "loading"],
  }});
  const isTyping = (el) => {{
    if (!el) return false;
    const tag = (el.tagName || "").toLowerCase();
    return tag === "input" || tag === "textarea" || tag === "select" || el.isContentEditable;
  }};
  document.addEventListener("keydown", (event) => {{
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (isTyping(event.target)) return;
    const id = keyToButton[event.key];
    if (!id) return;
    const found = document.getElementById(id);
    const button = found && found.tagName !== "BUTTON" ? found.querySelector("button") : found;
    if (!button || button.disabled || button.offsetParent === null) return;
    event.preventDefault();
    // The pair on screen and the preloaded next one, as the hidden fields hold them: a vote
    // shows the next pair in this very event, before the click reaches Gradio.
    const field = (id) => {{
      const el = document.querySelector(`#${{id}} textarea, #${{id}} input`);
      return el ? el.value : "";
    }};
    if (button.id.startsWith("prefloop-vote") || (found && found.id.startsWith("prefloop-vote"))) {{
      window.__prefloopTrySwap(field("prefloop-token"), field("prefloop-preload-info"));
    }}
    if (document.activeElement && document.activeElement !== document.body) {{
      document.activeElement.blur();
    }}
    button.click();
  }}, true);
}}
"""


#: Defined once by the page-load script: shows the preloaded next pair at once when it is the
#: successor of the pair on screen (``preload`` is ``{"after": token, "prompt": text}``) and its
#: images are loaded; remembers what it replaced (``window.__prefloopSwap``). Called from the
#: key handler (before the click) and from the click itself; the first call wins.
TRY_SWAP_JS = """
(token, preload) => {
  try {
    const info = preload ? JSON.parse(preload) : null;
    const next = [...document.querySelectorAll(".prefloop-preload img")];
    const shown = ["#prefloop-left img", "#prefloop-right img"].map((s) => document.querySelector(s));
    const prompt = document.querySelector("#prefloop-prompt p");
    const ready = info && token && info.after === token && next.length === 2
      && shown.every(Boolean) && next.every((i) => i.complete && i.naturalWidth > 0)
      && next.every((i, k) => i.src !== shown[k].src);
    if (ready && !window.__prefloopSwap) {
      window.__prefloopSwap = {
        token, srcs: shown.map((i) => i.src), prompt: prompt ? prompt.innerHTML : null,
        shownAt: performance.now(),
      };
      shown.forEach((img, k) => { img.src = next[k].src; });
      if (prompt) {
        const label = document.createElement("strong");
        label.textContent = "Prompt:";
        prompt.replaceChildren(label, document.createTextNode(" " + info.prompt));
      }
    }
  } catch (e) {
    window.__prefloopSwap = null;
  }
}
"""


#: Runs in the browser when a new pair's token lands on the page: the display time (or, when
#: the vote click already showed this pair, the time it did).
MARK_SHOWN_JS = """
() => {
  const swap = window.__prefloopSwap;
  window.__prefloopShownAt = swap ? swap.shownAt : performance.now();
  window.__prefloopSwap = null;
}
"""

#: Runs in the browser on a vote click, before the server call: passes the time since display,
#: and shows the preloaded next pair at once when it is the successor of the pair on screen
#: (``preload`` is ``{"after": token, "prompt": text}``) and its images are loaded. Inputs
#: are (session state, shown-pair token, latency, preload info); the state value is ignored by
#: the server (Gradio keeps state server-side), the token passes through, the latency is filled.
VOTE_CLICK_JS = """
(state, token, latency, preload) => {
  const shownAt = window.__prefloopShownAt;
  const ms = typeof shownAt === "number" ? Math.round(performance.now() - shownAt) : -1;
  if (window.__prefloopTrySwap) window.__prefloopTrySwap(token, preload);
  return [state, token, ms, preload];
}
"""

#: Runs in the browser once the vote's answer is on the page: if the server kept the same pair
#: (the vote was not saved, or the press was stale), undo the click's swap.
VOTE_DONE_JS = """
(token) => {
  const swap = window.__prefloopSwap;
  if (swap && swap.token === token) {
    const shown = ["#prefloop-left img", "#prefloop-right img"].map((s) => document.querySelector(s));
    shown.forEach((img, k) => { if (img) img.src = swap.srcs[k]; });
    const prompt = document.querySelector("#prefloop-prompt p");
    if (prompt && swap.prompt !== null) prompt.innerHTML = swap.prompt;
    window.__prefloopSwap = null;
  }
  return [];
}
"""
