//! The differences between an expected and an actual JSON value, as
//! `switchyard test` and the in-process test harness report them.

use serde_json::Value;

/// The differences between `want` and `got`, each as `path: expected X, got
/// Y`. With `subset`, fields of `got` that `want` does not name are fine.
pub fn json_diff(path: &str, want: &Value, got: &Value, subset: bool, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => json_diff(&p, wv, gv, subset, out),
                    None => out.push(format!("{p}: expected {wv}, missing")),
                }
            }
            if !subset {
                for (k, gv) in g {
                    if !w.contains_key(k) {
                        out.push(format!("{path}.{k}: not expected, got {gv}"));
                    }
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.len() != g.len() {
                out.push(format!(
                    "{path}: expected {} items, got {}",
                    w.len(),
                    g.len()
                ));
            }
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                json_diff(&format!("{path}[{i}]"), wv, gv, subset, out);
            }
        }
        // TOML has no null and writes every number it can as an integer:
        // 1 and 1.0 are the same value here.
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => {}
        (w, g) if w == g => {}
        (w, g) => out.push(format!("{path}: expected {w}, got {g}")),
    }
}
