//! HTML output. Every value from the database or the request reaches a page through [`text`],
//! [`bytes`] or [`payload`]; nothing else inserts data into markup, and every attribute is
//! double-quoted, so one escape function covers both text and attribute positions.

use std::fmt::Write as _;
use std::time::Duration;

use outbox::admin::PublishedInterval;

/// `value` escaped for HTML text and double- or single-quoted attributes, with control and
/// bidirectional-override characters shown as `\u{..}`: they could hide or reorder what an
/// operator reads (a key that looks like another).
pub(crate) fn text(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if hidden(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Control characters but line breaks and tabs (payloads show in `<pre>`), and the invisible
/// ones that reorder or hide text.
fn hidden(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t') || outbox::admin::is_invisible_format(c)
}

/// A key as the listings read it: as text when it is UTF-8, else as hex (marked so); a key cut
/// at `outbox::admin::SHOWN_KEY_BYTES` says so.
pub(crate) fn key(value: Option<&[u8]>, cut: bool) -> String {
    let Some(value) = value else {
        return "<i>none</i>".into();
    };
    let body = match utf8(value, cut) {
        Some(utf8) => text(utf8),
        None => format!("hex {}", hex(value)),
    };
    let cut = if cut { " <small>(cut)</small>" } else { "" };
    format!("<code>{body}</code>{cut}")
}

/// A payload preview: `shown` is its first bytes (cut by the database), `size` the whole size.
/// UTF-8 shows as text, anything else as hex.
pub(crate) fn payload(shown: Option<&[u8]>, size: i64) -> String {
    let Some(shown) = shown else {
        return "<i>no payload</i>".into();
    };
    let body = match utf8(shown, shown.len() as i64 != size) {
        Some(utf8) => text(utf8),
        None => format!("hex {}", hex(shown)),
    };
    let cut = if (shown.len() as i64) < size {
        format!(" <small>(first {} of {size} bytes)</small>", shown.len())
    } else {
        String::new()
    };
    format!("<pre>{body}</pre>{cut}")
}

/// `shown` as text if it is UTF-8; when it is the start of something longer (`cut`), a
/// character cut at its end is dropped: the cut, not binary data.
fn utf8(shown: &[u8], cut: bool) -> Option<&str> {
    match std::str::from_utf8(shown) {
        Ok(utf8) => Some(utf8),
        Err(e) if cut && e.error_len().is_none() => {
            std::str::from_utf8(&shown[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

fn hex(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for (i, byte) in value.iter().enumerate() {
        let _ = write!(out, "{}{byte:02x}", if i > 0 { " " } else { "" });
    }
    out
}

/// A duration for people: `850 ms`, `12.4 s`, `3.5 min`, `2.0 h`, `3.1 d`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    match s {
        s if s < 1.0 => format!("{} ms", d.as_millis()),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

/// The parts every page shares.
pub(crate) struct Layout<'a> {
    /// Where the console is mounted ("" at the root), for links.
    pub(crate) base: &'a str,
    /// Write actions are enabled.
    pub(crate) writes: bool,
    /// The session's CSRF token, when logged in.
    pub(crate) csrf: Option<&'a str>,
}

impl Layout<'_> {
    /// The URL of console path `path` (which starts with `/`).
    pub(crate) fn href(&self, path: &str) -> String {
        match (self.base, path) {
            ("", path) => path.to_owned(),
            (base, "/") => base.to_owned(),
            (base, path) => format!("{base}{path}"),
        }
    }

    /// A whole page: navigation, `title` (already HTML) and `body`.
    pub(crate) fn page(&self, title: &str, body: &str) -> String {
        let nav = [
            ("/", "Overview"),
            ("/blocked", "Blocked keys"),
            ("/dead-letters", "Dead letters"),
            ("/republish", "Republish"),
        ]
        .iter()
        .map(|(path, name)| format!("<a href=\"{}\">{name}</a>", text(&self.href(path))))
        .collect::<Vec<_>>()
        .join(" ");
        let session = match (self.writes, self.csrf) {
            (false, _) => "<span class=\"muted\">read-only</span>".to_owned(),
            (true, None) => format!(
                "<a href=\"{}\">Log in to act</a>",
                text(&self.href("/login"))
            ),
            (true, Some(_)) => format!(
                "<form method=\"post\" action=\"{}\" class=\"inline\">{}<button>Log out</button></form>",
                text(&self.href("/logout")),
                self.csrf_field()
            ),
        };
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>{title} · outbox console</title><style>{CSS}</style></head>\
             <body><header><b>outbox</b> {nav} <span class=\"right\">{session}</span></header>\
             <main><h1>{title}</h1>\n{body}\n</main></body></html>\n"
        )
    }

    /// The hidden CSRF field of a write form (empty when not logged in).
    pub(crate) fn csrf_field(&self) -> String {
        self.csrf.map_or_else(String::new, |csrf| {
            format!(
                "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
                text(csrf)
            )
        })
    }
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{background:#263238;color:#eee;padding:8px 16px}header a{color:#cfe8fc;margin-left:12px}\
.right{float:right}.muted{color:#999}main{padding:8px 16px}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;\
text-align:left;vertical-align:top}th{background:#f3f3f3}\
pre{margin:0;max-width:60em;max-height:12em;overflow:auto;white-space:pre-wrap;word-break:break-all}\
.bad{color:#b00020}.ok{color:#1b5e20}.inline{display:inline}.danger{background:#ffebee}\
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:bold}\
label{display:inline-block;min-width:9em}";

/// Inline-SVG chart of [`PublishedInterval`]s: bars for messages published, a line for the
/// mean insert-to-publish lag, each scaled to its own maximum (printed beside it).
pub(crate) fn chart(intervals: &[PublishedInterval], interval: Duration) -> String {
    let (width, height, n) = (600.0, 120.0, intervals.len().max(1) as f64);
    let step = width / n;
    let most = intervals
        .iter()
        .map(|i| i.published)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let longest = intervals
        .iter()
        .filter_map(|i| i.mean_lag)
        .max()
        .unwrap_or_default();
    let longest_s = longest.as_secs_f64().max(1e-6);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" \
         role=\"img\" aria-label=\"publish rate and lag\"><rect width=\"{width}\" \
         height=\"{height}\" fill=\"#fafafa\" stroke=\"#ccc\"/>",
        height + 20.0
    );
    let mut line = Vec::new();
    for (i, bucket) in intervals.iter().enumerate() {
        let x = i as f64 * step;
        let h = bucket.published as f64 / most * (height - 4.0);
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#64b5f6\">\
             <title>{} published, mean lag {}</title></rect>",
            x + 1.0,
            height - h,
            (step - 2.0).max(1.0),
            bucket.published,
            bucket.mean_lag.map_or_else(|| "-".into(), duration),
        );
        if let Some(lag) = bucket.mean_lag {
            let y = height - lag.as_secs_f64() / longest_s * (height - 4.0);
            line.push(format!("{:.1},{y:.1}", x + step / 2.0));
            // A dot too: a single interval with traffic makes no line.
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"#e65100\"/>",
                x + step / 2.0
            );
        }
    }
    if !line.is_empty() {
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#e65100\" stroke-width=\"2\"/>",
            line.join(" ")
        );
    }
    let _ = write!(
        svg,
        "<text x=\"2\" y=\"{}\" font-size=\"11\" fill=\"#1565c0\">bars: published per {} \
         (max {})</text><text x=\"{width}\" y=\"{}\" font-size=\"11\" fill=\"#e65100\" \
         text-anchor=\"end\">line: mean insert→publish lag (max {})</text></svg>",
        height + 14.0,
        duration(interval),
        most as i64,
        height + 14.0,
        duration(longest)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_escapes_markup_quotes_and_hidden_characters() {
        assert_eq!(
            text("<script>alert('x')</script>\"&"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"
        );
        assert_eq!(text("a\x1b[2J\u{202e}b\nc"), "a\\u{1b}[2J\\u{202e}b\nc");
    }

    #[test]
    fn binary_shows_as_hex_and_a_cut_character_is_not_binary() {
        assert_eq!(key(Some(b"\xff\x00<"), false), "<code>hex ff 00 3c</code>");
        assert_eq!(key(Some(b"<k>"), false), "<code>&lt;k&gt;</code>");
        // A key cut inside a character, and one that ends with an incomplete one whole.
        assert_eq!(
            key(Some(b"caf\xc3"), true),
            "<code>caf</code> <small>(cut)</small>"
        );
        assert_eq!(key(Some(b"caf\xc3"), false), "<code>hex 63 61 66 c3</code>");
        // "é" is two bytes; the preview kept one.
        assert_eq!(
            payload(Some(b"caf\xc3"), 5),
            "<pre>caf</pre> <small>(first 4 of 5 bytes)</small>"
        );
        assert_eq!(payload(Some(b"\xc3"), 1), "<pre>hex c3</pre>");
    }
}
