//! Bounded concurrency without the futures crate: `limit` tasks in flight over a list.

use anyhow::Result;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Runs `f` on every item, at most `limit` at once; the first error is returned (after every
/// task has ended).
pub async fn for_each_limited<T, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    let mut tasks = JoinSet::new();
    for item in items {
        let permit = permits.clone().acquire_owned().await?;
        let work = f(item);
        tasks.spawn(async move {
            let result = work.await;
            drop(permit);
            result
        });
    }
    let mut first = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let (Ok(()), Err(e)) = (&first, done.map_err(anyhow::Error::from).and_then(|r| r)) {
            first = Err(e);
        }
    }
    first
}
