//! What every decoder target checks of a decoded message.

use switchyard::envelope::{Envelope, Kind};
use switchyard::limits;

/// What a route does before its plugin sees a message, and what must hold
/// after: a message that passes the limits has a safe id; one that does
/// not is given one.
pub fn admit(e: &mut Envelope, malformed: Option<String>, kind_of: fn(&str) -> Option<Kind>) {
    let refused = malformed.or_else(|| limits::check_inbound(e, &kind_of, 1 << 20).err());
    match refused {
        Some(reason) => {
            assert!(!reason.is_empty());
            assert!(reason.len() < 4096, "a reason quotes only a clipped value");
            limits::sanitize(e);
        }
        None => assert!(kind_of(&e.message_type).is_some()),
    }
    assert!(!e.id.is_empty() && e.id.len() <= limits::MAX_ID, "{:?}", e.id);
    assert!(!e.id.chars().any(char::is_control), "{:?}", e.id);
}
