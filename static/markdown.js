// Markdown for model text (DESIGN.md "The page"): markdown-it (no raw HTML) renders it,
// highlight.js colours fenced code, and DOMPurify sanitizes the result against an
// allow-list before any of it reaches the page. The libraries are vendored at pinned
// versions in vendor/ (vendor/README.md: versions, sources, sha256 of each file).
//
// What comes out is a DocumentFragment of inert elements: no script, no event handler
// attribute, no javascript: (or other non-http(s)/mailto) link, no image, no SVG or MathML,
// no inline style (the page's CSP forbids it too). Links open in a new tab with
// rel="noopener noreferrer". Each code block gets a "Copy" button; `copyCode` is its
// click handler, delegated by whoever shows the fragment.

import createDOMPurify from "./vendor/dompurify/purify.es.js";
import hljs from "./vendor/highlight.js/highlight.min.js";
import MarkdownIt from "./vendor/markdown-it/markdown-it.esm.min.js";

const md = new MarkdownIt({
  html: false, // raw HTML in model text is shown as text, never parsed
  linkify: true,
  typographer: false,
  highlight(code, language) {
    const name = language && hljs.getLanguage(language) ? language : null;
    if (!name) return ""; // markdown-it escapes it
    try {
      return hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
    } catch {
      return "";
    }
  },
});

// A table column's alignment as a class (the CSP forbids style attributes).
md.core.ruler.push("align_classes", (state) => {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const style = token.attrGet("style");
    if (!style) continue;
    const match = /^text-align:(left|right|center)$/.exec(style);
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    if (match) token.attrJoin("class", `align-${match[1]}`);
  }
});

// An image is shown as a link to it, labelled with its alt text: the page loads nothing
// a reply names (and the CSP would refuse most of it anyway).
md.renderer.rules.image = (tokens, index, options, env, self) => {
  const token = tokens[index];
  const src = md.utils.escapeHtml(token.attrGet("src") || "");
  const alt = md.utils.escapeHtml(self.renderInlineAsText(token.children || [], options, env));
  return `<a href="${src}">${alt || src}</a>`;
};

const purify = createDOMPurify(window);

const ALLOWED_TAGS = [
  "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
  "li", "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr",
  "ul",
];
const PURIFY = {
  ALLOWED_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  } else if (node.nodeName === "CODE" && node.parentNode?.nodeName === "PRE") {
    node.classList.add("hljs"); // the theme's colours, highlighted or not
  }
});

/**
 * Model text as sanitized, rendered Markdown.
 * @param {string} text Markdown (possibly cut mid-way: a reply still streaming)
 * @returns {DocumentFragment}
 */
export function renderMarkdown(text) {
  return finish(md.render(text));
}

/**
 * An element that shows a text as Markdown, and keeps showing it as the text grows: each
 * `draw` renders anew only the text's last top-level blocks, those more text could still
 * change, so a reply of n characters drawn once a frame costs about the size of its last
 * block a frame, not n.
 *
 * A top-level block is settled once another one follows it whose first line is complete
 * (a line break after it): what comes after can no longer change it. (Before its first
 * line is complete, the next block may still turn out to continue it: "3" after a list
 * is a paragraph, "3." one more item.) Settled blocks keep their elements, and the next
 * `draw` parses only from the start of the last block on. Link reference definitions
 * (`[label]: url`) can change a link anywhere in the text: while the text has one,
 * nothing is settled and each `draw` renders it whole. So at each `draw` the element
 * shows what `renderMarkdown(text)` would (tests/test_browser_markdown.py checks it).
 * @param {HTMLElement} element where the Markdown goes; its children are this one's
 * @returns {{draw: (text: string) => void}} `text`: the whole text as it stands now
 */
export function createMarkdownView(element) {
  /** The settled text: a prefix of every text drawn since. */
  let settled = "";
  /** The nodes of the blocks after the settled ones, as last drawn. */
  let open = [];

  function draw(text) {
    if (!text.startsWith(settled)) {
      settled = "";
      open = [...element.childNodes];
    }
    const tail = text.slice(settled.length);
    const env = {};
    const tokens = md.parse(tail, env);
    const references = env.references && Object.keys(env.references).length > 0;
    if (references && settled) {
      // A definition after settled blocks: they may link to it. Render it all anew.
      settled = "";
      open = [...element.childNodes];
      return draw(text);
    }
    for (const node of open) node.remove();
    open = [];
    const blocks = topLevelBlocks(tokens);
    const last = blocks.length - 1;
    let keep = 0; // how many blocks settle now
    if (last > 0 && !references) {
      const start = lineOffset(tail, blocks[last].line);
      if (/\n|\r[^]/.test(tail.slice(start))) {
        keep = last;
        settled += tail.slice(0, start);
      }
    }
    // Two sanitizer passes at most: the blocks that settle now, and those still open.
    const html = (from, to) => md.renderer.render(
      blocks.slice(from, to).flatMap((block) => block.tokens), md.options, env);
    if (keep > 0) element.append(finish(html(0, keep)));
    const rest = finish(html(keep, blocks.length));
    open = [...rest.childNodes];
    element.append(rest);
  }

  return { draw };
}

/**
 * The top-level blocks of a token stream: each the tokens from a level-0 opening (or
 * self-contained) token to its level-0 end, and the line it begins on.
 * @param {object[]} tokens from markdown-it's `parse`
 * @returns {{tokens: object[], line: number}[]}
 */
function topLevelBlocks(tokens) {
  const blocks = [];
  let start = -1;
  tokens.forEach((token, index) => {
    if (token.level !== 0) return;
    if (start < 0) start = index;
    if (token.nesting <= 0) {
      blocks.push({ tokens: tokens.slice(start, index + 1), line: tokens[start].map?.[0] ?? 0 });
      start = -1;
    }
  });
  return blocks;
}

/** Where line `line` (0-based, lines as markdown-it counts them) begins in `text`. */
function lineOffset(text, line) {
  const breaks = /\r\n?|\n/g;
  let offset = 0;
  for (let k = 0; k < line; k += 1) {
    if (!breaks.exec(text)) return text.length;
    offset = breaks.lastIndex;
  }
  return offset;
}

/**
 * markdown-it's HTML, sanitized into a fragment, each code block with its "Copy" button.
 * @param {string} html
 * @returns {DocumentFragment}
 */
function finish(html) {
  const fragment = purify.sanitize(html, PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) {
    const block = document.createElement("div");
    block.className = "code-block";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    pre.replaceWith(block);
    block.append(copy, pre);
  }
  return fragment;
}

/**
 * The click handler of the "Copy" buttons inside `container` (delegated: a re-render
 * replaces the buttons). Copies the block's code as text.
 * @param {MouseEvent} event
 */
export async function copyCode(event) {
  const button = event.target.closest?.("button.copy");
  if (!button) return;
  const code = button.parentElement?.querySelector("pre")?.textContent ?? "";
  try {
    await navigator.clipboard.writeText(code);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => {
    if (button.isConnected) button.textContent = "Copy";
  }, 1500);
}
