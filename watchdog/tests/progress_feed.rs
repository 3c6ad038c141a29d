//! `GET /api/v1/progress?since=&epoch=&limit=` over a real socket: cursor semantics, a new
//! epoch after a restart, the limit and `more`, the token, and bad input answered 400.

mod support;

use api::{ErrorBody, JobId, ProgressFeed, ProgressUpdate};
use reqwest::StatusCode;
use support::{TOKEN, get_json, progress_body, sleep_launcher, start};

fn record(server: &support::Server, job: &str, bytes: u64) {
    let update: ProgressUpdate = serde_json::from_value(progress_body(bytes)).unwrap();
    server
        .state
        .progress
        .record(&JobId::parse(job).unwrap(), update)
        .unwrap();
}

fn ids(feed: &ProgressFeed) -> Vec<(&str, u64)> {
    feed.jobs
        .iter()
        .map(|p| (p.job_id.as_str(), p.update.bytes_transferred))
        .collect()
}

async fn feed(client: &reqwest::Client, server: &support::Server, query: &str) -> ProgressFeed {
    get_json(client, &server.url(&format!("/api/v1/progress{query}"))).await
}

#[tokio::test]
async fn the_feed_answers_what_changed_since_the_cursor_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    let empty = feed(&client, &server, "").await;
    assert!(empty.jobs.is_empty() && !empty.more);
    for (job, bytes) in [("job-a", 1), ("job-b", 2), ("job-c", 3)] {
        record(&server, job, bytes);
    }
    let all = feed(&client, &server, "").await;
    assert_eq!(ids(&all), [("job-a", 1), ("job-b", 2), ("job-c", 3)]);
    assert!(!all.more);
    let epoch = all.epoch;
    // Nothing changed: nothing answered, the cursor stays.
    let since = |cursor: u64| format!("?since={cursor}&epoch={epoch}");
    let none = feed(&client, &server, &since(all.cursor)).await;
    assert!(none.jobs.is_empty());
    assert_eq!((none.cursor, none.epoch), (all.cursor, epoch));
    // One job moves twice: it comes once, with its latest update.
    record(&server, "job-b", 20);
    record(&server, "job-b", 21);
    let changed = feed(&client, &server, &since(all.cursor)).await;
    assert_eq!(ids(&changed), [("job-b", 21)]);
    assert_eq!(changed.jobs[0].sequence, 3);
    // The limit cuts, `more` says so, and the cursor resumes after the last job sent.
    record(&server, "job-a", 10);
    record(&server, "job-c", 30);
    let first = feed(
        &client,
        &server,
        &format!("{}&limit=1", since(changed.cursor)),
    )
    .await;
    assert_eq!((ids(&first), first.more), (vec![("job-a", 10)], true));
    let rest = feed(
        &client,
        &server,
        &format!("{}&limit=1", since(first.cursor)),
    )
    .await;
    assert_eq!((ids(&rest), rest.more), (vec![("job-c", 30)], false));
    // A forgotten job is in no answer.
    server
        .state
        .progress
        .forget(&JobId::parse("job-a").unwrap())
        .unwrap();
    let left = feed(&client, &server, "?since=0").await;
    assert_eq!(ids(&left), [("job-b", 21), ("job-c", 30)]);
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_watchdog_answers_a_stale_cursor_from_the_beginning() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    record(&server, "job-a", 1);
    record(&server, "job-b", 2);
    let before = feed(&client, &server, "").await;
    server.stop().await;
    let server = start(dir.path(), sleep_launcher()).await;
    let query = format!("?since={}&epoch={}", before.cursor, before.epoch);
    let after = feed(&client, &server, &query).await;
    assert_ne!(after.epoch, before.epoch, "a new process, a new epoch");
    assert_eq!(ids(&after), [("job-a", 1), ("job-b", 2)]);
    server.stop().await;
}

#[tokio::test]
async fn the_feed_needs_the_token_and_refuses_bad_queries_with_an_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    for token in [None, Some("wrong-token")] {
        let mut request = client.get(server.url("/api/v1/progress"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{token:?}");
    }
    for query in [
        "?since=-1",
        "?since=abc",
        "?limit=99999999999",
        "?limit=4294967295",
        "?since=18446744073709551615",
        "?epoch=not-a-uuid",
        "?other=1",
    ] {
        let response = client
            .get(server.url(&format!("/api/v1/progress{query}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error, "invalid_query", "{query}");
    }
    // A huge limit within its type is capped, not refused; 0 means the default.
    for query in [
        "?limit=2147483647",
        "?limit=0",
        "?since=9223372036854775807",
    ] {
        let response = client
            .get(server.url(&format!("/api/v1/progress{query}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{query}");
    }
    server.stop().await;
}
