//! The dead-letter filter options (`switchyard dlq list --plugin … --type …
//! --kind … --status … --since … --until … --limit …`): any values are a
//! filter or a clear error, and any filter is a query the store runs (here
//! the SQLite store).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard::cli::dlq::FilterArgs;
use switchyard::dlq::DeadLetterStore;
use switchyard::dlq::sqlite::SqliteStore;

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    plugin: Option<String>,
    message_type: Option<String>,
    kind: Option<String>,
    status: Vec<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u64>,
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store =
            SqliteStore::open(&dir.path().join("dlq.db"), "shop").expect("the SQLite store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        Fixture {
            runtime,
            store,
            _dir: dir,
        }
    })
}

fuzz_target!(|input: Input| {
    let args = FilterArgs {
        plugin: input.plugin,
        message_type: input.message_type,
        kind: input.kind,
        status: input.status,
        since: input.since,
        until: input.until,
        limit: input.limit,
    };
    let Ok(filter) = args.to_filter() else { return };
    let f = fixture();
    f.runtime.block_on(async {
        f.store.list(&filter).await.expect("any filter is a query");
        f.store.groups(&filter).await.expect("any filter groups");
    });
});
