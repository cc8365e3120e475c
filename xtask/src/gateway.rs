//! The demo's stand-in payment gateway: `POST /charges` on
//! 127.0.0.1:8181, the origin the example pipeline grants the payments
//! plugin. It keeps one charge per `Idempotency-Key` (a retried request
//! gets the same charge back), times out (504) the first two requests for
//! an amount whose cents end in 13, and declines (402) a card whose
//! customer is `mallory`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub const ADDRESS: &str = "127.0.0.1:8181";

/// Per idempotency key: requests seen, and the charge made.
type Ledger = Arc<Mutex<HashMap<String, (u32, Option<String>)>>>;

/// Starts the gateway on a thread of its own; it lives as long as the
/// process.
pub fn start() -> Result<(), String> {
    let listener = TcpListener::bind(ADDRESS).map_err(|e| {
        format!(
            "cannot start the demo's payment gateway on {ADDRESS}: {e} (is another demo running?)"
        )
    })?;
    let ledger: Ledger = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &ledger);
            });
        }
    });
    Ok(())
}

fn serve(stream: TcpStream, ledger: &Ledger) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let (mut length, mut key) = (0usize, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0).min(1 << 20),
                "idempotency-key" => key = value.trim().to_owned(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let (status, answer) = if !request_line.starts_with("POST /charges ") {
        (404, serde_json::json!({ "error": "no such endpoint" }))
    } else {
        charge(ledger, &key, &body)
    };
    let text = answer.to_string();
    let reason = match status {
        200 => "OK",
        402 => "Payment Required",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

fn charge(ledger: &Ledger, key: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let Ok(charge) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (400, serde_json::json!({ "error": "the body is not JSON" }));
    };
    let amount = charge["amount_cents"].as_u64().unwrap_or(0);
    let mut ledger = ledger
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let next = ledger.len() + 1;
    let (seen, made) = ledger.entry(key.to_owned()).or_insert((0, None));
    *seen += 1;
    if let Some(id) = made {
        return (200, serde_json::json!({ "charge": id, "repeated": true }));
    }
    if amount % 100 == 13 && *seen <= 2 {
        return (
            504,
            serde_json::json!({ "error": "the card network did not answer in time" }),
        );
    }
    if charge["customer"] == "mallory" {
        return (
            402,
            serde_json::json!({ "error": "card declined: insufficient funds" }),
        );
    }
    let id = format!("ch_{next:04}");
    *made = Some(id.clone());
    (200, serde_json::json!({ "charge": id }))
}
