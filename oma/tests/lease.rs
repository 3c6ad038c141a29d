//! VMA polling leases on a real database: three OMAs' lease tasks share the VMAs evenly, each
//! VMA owned by exactly one; one that stops renewing (dead or stalled) loses its VMAs to the
//! others after one lease period, and sees itself as owning none by then; a clean stop hands
//! the VMAs on at once. On SQLite the one OMA owns them all.

mod common;

use common::{store_with_vmas, test_dbs};
use oma::auth::hash_token;
use oma::lease::{LeaseConfig, Leases};
use oma::store::Store;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const PERIOD: Duration = Duration::from_millis(900);

fn leases(store: &Store, name: &str) -> Arc<Leases> {
    let config = LeaseConfig {
        period: PERIOD,
        name: name.into(),
    };
    Leases::new(config, store.backend())
}

async fn with_ten_vmas(db: &common::TestDb) -> Store {
    let store = store_with_vmas(db, "http://127.0.0.1:9", "http://127.0.0.1:9").await;
    for i in 3..=10 {
        let token = format!("vma-{i}-token-for-lease-tests-0000");
        store
            .upsert_vma(
                &format!("vma-{i}"),
                "http://127.0.0.1:9",
                &hash_token(&token),
            )
            .await
            .unwrap();
    }
    store
}

fn nothing() {}

/// Ticks every OMA in `omas` `rounds` times, in turn.
async fn tick_all(store: &Store, omas: &[Arc<Leases>], rounds: usize) {
    for _ in 0..rounds {
        for oma in omas {
            oma.tick(store, &nothing).await.unwrap();
        }
    }
}

/// Asserts that every VMA has exactly one owner among `omas`, and returns each one's count.
fn exclusive(omas: &[Arc<Leases>]) -> Vec<usize> {
    let mut seen = HashSet::new();
    for oma in omas {
        for vma in oma.owned_vmas() {
            assert!(seen.insert(vma.clone()), "{vma} is owned by two OMAs");
        }
    }
    assert_eq!(seen.len(), 10, "every VMA is owned: {seen:?}");
    omas.iter().map(|o| o.owned_vmas().len()).collect()
}

#[tokio::test]
async fn three_omas_share_the_vmas_and_take_over_from_one_that_stops_renewing() {
    for db in test_dbs().await {
        if db.backend != "postgres" {
            continue;
        }
        let store = with_ten_vmas(&db).await;
        let omas = [
            leases(&store, "a"),
            leases(&store, "b"),
            leases(&store, "c"),
        ];
        tick_all(&store, &omas, 4).await;
        let mut counts = exclusive(&omas);
        counts.sort();
        assert_eq!(counts, vec![3, 3, 4], "ceil(10 / 3) each at most");

        // `a` stalls: it stops renewing. Before a lease period has passed, nobody takes its
        // VMAs; after it, the others do, and `a` no longer thinks it owns them.
        let stalled: HashSet<String> = omas[0].owned_vmas();
        let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = lost.clone();
        let on_lost = move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let stalled_at = tokio::time::Instant::now();
        let mut before_expiry_checked = false;
        while stalled_at.elapsed() < PERIOD + Duration::from_millis(150) {
            for oma in &omas[1..] {
                oma.tick(&store, &on_lost).await.unwrap();
            }
            if !before_expiry_checked {
                assert_eq!(
                    exclusive(&omas)[0],
                    stalled.len(),
                    "not taken before expiry"
                );
                before_expiry_checked = true;
            }
            tokio::time::sleep(PERIOD / 4).await;
        }
        for oma in &omas[1..] {
            oma.tick(&store, &on_lost).await.unwrap();
        }
        assert!(
            omas[0].owned_vmas().is_empty(),
            "a stalled OMA's own view lapses"
        );
        assert_eq!(
            lost.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one OMA reaps `a`"
        );
        let survivors = exclusive(&omas[1..]);
        assert_eq!(survivors, vec![5, 5], "the survivors share a's VMAs");
        for vma in &stalled {
            assert!(omas[1].owns(vma) || omas[2].owns(vma));
        }

        // `a` wakes up: it is a new member again, renews nothing (its leases were taken) and
        // gets its share back through rebalancing, never a VMA owned twice.
        tick_all(&store, &omas, 3).await;
        let mut counts = exclusive(&omas);
        counts.sort();
        assert_eq!(counts, vec![3, 3, 4]);
        let generations: Vec<i64> = store
            .poll_leases()
            .await
            .unwrap()
            .iter()
            .map(|l| l.3)
            .collect();
        assert!(generations.iter().all(|g| *g >= 1), "{generations:?}");
        store.close().await;
    }
}

#[tokio::test]
async fn a_clean_stop_hands_the_vmas_on_at_once() {
    for db in test_dbs().await {
        if db.backend != "postgres" {
            continue;
        }
        let store = with_ten_vmas(&db).await;
        let (a, b) = (leases(&store, "a"), leases(&store, "b"));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(
            a.clone()
                .run_forever(store.clone(), Arc::new(nothing), stopped),
        );
        common::eventually(10, "a owns every VMA", || {
            let a = a.clone();
            async move { (a.owned_vmas().len() == 10).then_some(()) }
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(a.owned_vmas().is_empty());
        b.tick(&store, &nothing).await.unwrap();
        assert_eq!(
            b.owned_vmas().len(),
            10,
            "taken at b's next tick, not a period later"
        );
        store.close().await;
    }
}

#[tokio::test]
async fn a_restart_after_a_crash_takes_its_predecessors_leases_at_once() {
    for db in test_dbs().await {
        if db.backend != "postgres" {
            continue;
        }
        let store = with_ten_vmas(&db).await;
        let (a, b) = (leases(&store, "a"), leases(&store, "b"));
        tick_all(&store, &[a.clone(), b.clone()], 3).await;
        assert_eq!(exclusive(&[a.clone(), b.clone()]), vec![5, 5]);
        // `a` crashes (no clean stop) and starts again under the same name: its first tick
        // takes its predecessor's five leases without waiting for them to expire.
        let a_again = leases(&store, "a");
        a_again.tick(&store, &nothing).await.unwrap();
        assert_eq!(a_again.owned_vmas().len(), 5);
        let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM oma_instances ORDER BY name")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(
            names,
            [("a".to_owned(),), ("b".to_owned(),)],
            "the dead one is gone"
        );
        b.tick(&store, &nothing).await.unwrap();
        assert_eq!(exclusive(&[a_again, b]), vec![5, 5]);
        store.close().await;
    }
}

#[tokio::test]
async fn on_sqlite_the_one_oma_owns_every_vma() {
    for db in test_dbs().await {
        if db.backend != "sqlite" {
            continue;
        }
        let store = with_ten_vmas(&db).await;
        // A predecessor that died holding leases: its successor takes them at once.
        let dead = leases(&store, "dead");
        dead.tick(&store, &nothing).await.unwrap();
        assert_eq!(dead.owned_vmas().len(), 10);
        let oma = leases(&store, "oma");
        assert!(oma.owns("vma-1"), "SQLite's one OMA polls every VMA");
        oma.tick(&store, &nothing).await.unwrap();
        assert_eq!(oma.owned_vmas().len(), 10);
        store.close().await;
    }
}
