//! Text from outside the host (plugins, brokers, clients) made safe to log
//! and store.

/// Cuts text from outside the host to `max` bytes (on a character boundary) and
/// escapes control characters, so it cannot forge log lines or bloat records.
pub fn clip(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 16);
    for c in text.chars() {
        if out.len() >= max {
            out.push_str(" …[truncated]");
            break;
        }
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
