//! The job store: preheat jobs and their per-blob progress in SQL, one code path for SQLite
//! (a file in the scheduler's data dir, the default) and PostgreSQL (several schedulers
//! sharing one), through sqlx's `any` driver. Only the table definitions differ.
//!
//! A job runs on one scheduler at a time: a runner claims it with one conditional `UPDATE`
//! (both databases run it atomically: the second of two racing claims finds the lease taken
//! and changes nothing), and renews the lease while it runs. A runner that dies stops
//! renewing, and once its lease lapses another scheduler (or the same one restarted) claims
//! the job and resumes it from its recorded blobs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::job::{BlobProgress, Job, JobId, JobSpec, JobState, Origin, PeerResult, Scope, Summary, Target};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("job store: cannot create or open {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    /// Only the URL's scheme is kept: the rest may hold a password.
    #[error("job store: unsupported URL scheme {0:?} (sqlite://PATH or postgres://…)")]
    Url(String),
    #[error("job store: row {0} holds an unreadable value ({1})")]
    Corrupt(i64, &'static str),
}

/// Which database, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct JobStore {
    pool: AnyPool,
    backend: Backend,
}

/// A job taken by a runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub id: JobId,
    pub runner: String,
}

const JOB_COLUMNS: &str = "id, target, url, headers, scope, platforms, concurrency, timeout_ms, origin, state, \
                           error, result, created_ms, updated_ms, runner";

impl JobStore {
    /// The default store: `jobs.db` in `data_dir`, created if missing. Jobs hold the
    /// registry credentials they were given, so the file is the owner's only (SQLite gives its
    /// journal files the database's mode).
    pub async fn open_in(data_dir: &Path) -> Result<JobStore, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let dir_err = |source| StoreError::Dir { path: data_dir.display().to_string(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(dir_err)?;
        let file = data_dir.join("jobs.db");
        let file_err = |source| StoreError::Dir { path: file.display().to_string(), source };
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&file).map_err(file_err)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(file_err)?;
        let url = format!("sqlite://{}?mode=rwc", file.display());
        Self::open(&url).await
    }

    /// A store at `url`: `sqlite://PATH[?mode=rwc]` or `postgres://…`. Tables are created if
    /// missing.
    pub async fn open(url: &str) -> Result<JobStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(url.split(':').next().unwrap_or_default().chars().take(32).collect()));
        };
        // SQLite takes one writer at a time anyway; one connection avoids busy errors.
        let connections = if backend == Backend::Sqlite { 1 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        let store = JobStore { pool, backend };
        store.migrate(backend).await?;
        Ok(store)
    }

    async fn migrate(&self, backend: Backend) -> Result<(), StoreError> {
        let id = match backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode=WAL").execute(&self.pool).await?;
        }
        let jobs = format!(
            "CREATE TABLE IF NOT EXISTS preheat_jobs (
                id {id},
                target TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL, scope TEXT NOT NULL,
                platforms TEXT NOT NULL, concurrency BIGINT NOT NULL, timeout_ms BIGINT NOT NULL,
                origin TEXT NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL, result TEXT NOT NULL,
                created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, started_ms BIGINT NOT NULL,
                runner TEXT NOT NULL, lease_ms BIGINT NOT NULL, resolved BIGINT NOT NULL)"
        );
        for statement in [
            jobs.as_str(),
            "CREATE INDEX IF NOT EXISTS preheat_jobs_open ON preheat_jobs (state, lease_ms)",
            "CREATE TABLE IF NOT EXISTS preheat_blobs (
                job_id BIGINT NOT NULL, seq BIGINT NOT NULL, digest TEXT NOT NULL, length BIGINT NOT NULL,
                media_type TEXT NOT NULL, platform TEXT NOT NULL, wanted BIGINT NOT NULL, held BIGINT NOT NULL,
                holders TEXT NOT NULL, pieces_held BIGINT NOT NULL, piece_count BIGINT NOT NULL,
                error TEXT NOT NULL, PRIMARY KEY (job_id, digest))",
        ] {
            sqlx::query(statement).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    pub async fn create(&self, spec: &JobSpec) -> Result<JobId, StoreError> {
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO preheat_jobs (target, url, headers, scope, platforms, concurrency, timeout_ms, origin,
                state, error, result, created_ms, updated_ms, started_ms, runner, lease_ms, resolved)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '', '[]', $10, $10, 0, '', 0, 0) RETURNING id",
        )
        .bind(spec.target.as_str())
        .bind(text(&spec.url, MAX_URL))
        .bind(json(&spec.headers))
        .bind(spec.scope.as_str())
        .bind(json(&spec.platforms))
        .bind(i64::from(spec.concurrency))
        .bind(millis(spec.timeout))
        .bind(spec.origin.as_str())
        .bind(JobState::Pending.as_str())
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(JobId(row.try_get(0)?))
    }

    /// The job with its blobs, or `None` if there is no such job.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM preheat_jobs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut job = job_from(&row)?;
        job.blobs = self.blobs(id).await?;
        Ok(Some(job))
    }

    /// The newest `limit` jobs after skipping `offset`, without their blobs.
    pub async fn list(&self, limit: u32, offset: u32) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM preheat_jobs ORDER BY id DESC LIMIT $1 OFFSET $2"))
            .bind(i64::from(limit))
            .bind(i64::from(offset))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from).collect()
    }

    /// The newest job for this URL and scope, to spare Harbor's legacy client a second one.
    pub async fn latest_for(&self, url: &str, scope: Scope) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM preheat_jobs WHERE url = $1 AND scope = $2 ORDER BY id DESC LIMIT 1"
        ))
        .bind(url.to_owned())
        .bind(scope.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut job = job_from(&row)?;
        job.blobs = self.blobs(job.id).await?;
        Ok(Some(job))
    }

    pub async fn blobs(&self, id: JobId) -> Result<Vec<BlobProgress>, StoreError> {
        let rows = sqlx::query(
            "SELECT digest, length, media_type, platform, wanted, holders, pieces_held, piece_count, error
             FROM preheat_blobs WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BlobProgress {
                    digest: r.try_get("digest")?,
                    length: nonneg(r.try_get("length")?),
                    media_type: r.try_get("media_type")?,
                    platform: r.try_get("platform")?,
                    wanted: nonneg(r.try_get("wanted")?) as u32,
                    holders: serde_json::from_str(&r.try_get::<String, _>("holders")?)
                        .map_err(|_| StoreError::Corrupt(id.0, "holders"))?,
                    pieces_held: nonneg(r.try_get("pieces_held")?),
                    piece_count: nonneg(r.try_get("piece_count")?) as u32,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }

    /// Up to `limit` jobs no live runner holds, oldest first.
    pub async fn claimable(&self, limit: u32) -> Result<Vec<JobId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM preheat_jobs WHERE state IN ('PENDING', 'RUNNING') AND lease_ms < $1 ORDER BY id LIMIT $2",
        )
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(JobId(r.try_get(0)?))).collect()
    }

    /// Takes job `id` for `runner` for `lease`, if no live runner holds it. The lease check is
    /// in the statement itself, so of two schedulers racing for one job exactly one wins.
    pub async fn claim(&self, id: JobId, runner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE preheat_jobs SET runner = $1, lease_ms = $2, updated_ms = $3, state = 'RUNNING',
                started_ms = CASE WHEN started_ms = 0 THEN $3 ELSE started_ms END
             WHERE id = $4 AND state IN ('PENDING', 'RUNNING') AND lease_ms < $3",
        )
        .bind(runner.to_owned())
        .bind(now + millis(lease))
        .bind(now)
        .bind(id.0)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then(|| Claim { id, runner: runner.to_owned() }))
    }

    /// Extends the claim's lease; false when the job is no longer the claim's (it lapsed and
    /// another runner took it, or the job ended).
    pub async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE preheat_jobs SET lease_ms = $1 WHERE id = $2 AND runner = $3 AND state = 'RUNNING'")
                .bind(now_ms() + millis(lease))
                .bind(claim.id.0)
                .bind(claim.runner.clone())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the claimed job up for any runner to take at once (this scheduler stops).
    pub async fn release(&self, claim: &Claim) -> Result<(), StoreError> {
        sqlx::query("UPDATE preheat_jobs SET lease_ms = 0 WHERE id = $1 AND runner = $2 AND state = 'RUNNING'")
            .bind(claim.id.0)
            .bind(claim.runner.clone())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// When the claimed job first started running (Unix ms), and whether its blobs are known.
    pub async fn run_state(&self, claim: &Claim) -> Result<(i64, bool), StoreError> {
        let row = sqlx::query("SELECT started_ms, resolved FROM preheat_jobs WHERE id = $1")
            .bind(claim.id.0)
            .fetch_one(&self.pool)
            .await?;
        Ok((row.try_get(0)?, row.try_get::<i64, _>(1)? != 0))
    }

    /// Records the blobs the job resolved to, once; false if the job is no longer the claim's.
    pub async fn set_blobs(&self, claim: &Claim, blobs: &[BlobProgress]) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owned = sqlx::query("UPDATE preheat_jobs SET resolved = 1 WHERE id = $1 AND runner = $2 AND resolved = 0")
            .bind(claim.id.0)
            .bind(claim.runner.clone())
            .execute(&mut *tx)
            .await?;
        let owned = owned.rows_affected() == 1;
        if owned {
            for (seq, b) in blobs.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO preheat_blobs (job_id, seq, digest, length, media_type, platform, wanted, held,
                        holders, pieces_held, piece_count, error) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, '[]', 0, 0, '')",
                )
                .bind(claim.id.0)
                .bind(seq as i64)
                .bind(text(&b.digest, 100))
                .bind(i64::try_from(b.length).unwrap_or(i64::MAX))
                .bind(text(&b.media_type, 256))
                .bind(text(&b.platform, 64))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(owned)
    }

    /// Records how far the peers are with one blob.
    pub async fn set_progress(&self, claim: &Claim, blob: &BlobProgress) -> Result<(), StoreError> {
        // Only the claim's runner writes: one that lost its lease must not overwrite another's.
        sqlx::query(
            "UPDATE preheat_blobs SET wanted = $1, held = $2, holders = $3, pieces_held = $4, piece_count = $5,
                error = $6
             WHERE job_id = $7 AND digest = $8
               AND EXISTS (SELECT 1 FROM preheat_jobs WHERE id = $7 AND runner = $9 AND state = 'RUNNING')",
        )
        .bind(i64::from(blob.wanted))
        .bind(blob.holders.len() as i64)
        .bind(json(&blob.holders))
        .bind(i64::try_from(blob.pieces_held).unwrap_or(i64::MAX))
        .bind(i64::from(blob.piece_count))
        .bind(text(&blob.error, 1024))
        .bind(claim.id.0)
        .bind(blob.digest.clone())
        .bind(claim.runner.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends the claimed job, forgetting the credentials it carried; false if it was no longer
    /// the claim's.
    pub async fn finish(
        &self,
        claim: &Claim,
        state: JobState,
        error: &str,
        peers: &[PeerResult],
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE preheat_jobs SET state = $1, error = $2, result = $3, updated_ms = $4, lease_ms = 0, headers = '{}'
             WHERE id = $5 AND runner = $6 AND state = 'RUNNING'",
        )
        .bind(state.as_str())
        .bind(text(error, 2048))
        .bind(json(&peers))
        .bind(now_ms())
        .bind(claim.id.0)
        .bind(claim.runner.clone())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Jobs not yet ended.
    pub async fn open_count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM preheat_jobs WHERE state IN ('PENDING', 'RUNNING')")
            .fetch_one(&self.pool)
            .await?;
        Ok(nonneg(row.try_get(0)?))
    }

    /// Forgets jobs that ended before `before_ms` (Unix ms), with their blobs; returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ended = "SELECT id FROM preheat_jobs WHERE state IN ('SUCCESS', 'FAILURE') AND updated_ms < $1";
        sqlx::query(&format!("DELETE FROM preheat_blobs WHERE job_id IN ({ended})"))
            .bind(before_ms)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM preheat_jobs WHERE state IN ('SUCCESS', 'FAILURE') AND updated_ms < $1")
            .bind(before_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Each listed job's blobs summed up, in one query.
    pub async fn summaries(&self, jobs: &[JobId]) -> Result<HashMap<JobId, Summary>, StoreError> {
        let (Some(low), Some(high)) = (jobs.iter().min(), jobs.iter().max()) else { return Ok(HashMap::new()) };
        // Sums cast back to BIGINT: PostgreSQL sums BIGINTs as NUMERIC.
        let rows = sqlx::query(
            "SELECT job_id, COUNT(*) AS blobs,
                CAST(SUM(CASE WHEN wanted > 0 AND held >= wanted THEN 1 ELSE 0 END) AS BIGINT) AS held,
                CAST(SUM(length * CASE WHEN wanted > 0 THEN wanted ELSE 1 END) AS BIGINT) AS bytes,
                CAST(SUM(CASE WHEN wanted > 0 AND held >= wanted THEN length * wanted ELSE 0 END) AS BIGINT)
                    AS bytes_held,
                CAST(SUM(CASE WHEN error <> '' THEN 1 ELSE 0 END) AS BIGINT) AS failed
             FROM preheat_blobs WHERE job_id >= $1 AND job_id <= $2 GROUP BY job_id",
        )
        .bind(low.0)
        .bind(high.0)
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for r in &rows {
            let id = JobId(r.try_get("job_id")?);
            if jobs.contains(&id) {
                let count = |name: &str| r.try_get::<i64, _>(name).map(nonneg);
                out.insert(
                    id,
                    Summary {
                        blobs: count("blobs")?,
                        held: count("held")?,
                        bytes: count("bytes")?,
                        bytes_held: count("bytes_held")?,
                        failed: count("failed")?,
                    },
                );
            }
        }
        Ok(out)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn job_from(r: &AnyRow) -> Result<Job, StoreError> {
    let id: i64 = r.try_get("id")?;
    let text = |name: &'static str| r.try_get::<String, _>(name);
    let corrupt = |what| StoreError::Corrupt(id, what);
    let headers: BTreeMap<String, String> = serde_json::from_str(&text("headers")?).map_err(|_| corrupt("headers"))?;
    let spec = JobSpec {
        target: Target::parse(&text("target")?).ok_or_else(|| corrupt("target"))?,
        url: text("url")?,
        headers,
        scope: Scope::parse(&text("scope")?).ok_or_else(|| corrupt("scope"))?,
        platforms: serde_json::from_str(&text("platforms")?).map_err(|_| corrupt("platforms"))?,
        concurrency: nonneg(r.try_get("concurrency")?) as u32,
        timeout: Duration::from_millis(nonneg(r.try_get("timeout_ms")?)),
        origin: Origin::parse(&text("origin")?).ok_or_else(|| corrupt("origin"))?,
    };
    Ok(Job {
        id: JobId(id),
        spec,
        state: JobState::parse(&text("state")?).ok_or_else(|| corrupt("state"))?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        error: text("error")?,
        peers: serde_json::from_str(&text("result")?).map_err(|_| corrupt("result"))?,
        runner: text("runner")?,
        blobs: Vec::new(),
    })
}

/// Longest URL a job may name.
pub const MAX_URL: usize = 2048;

/// Text from the network as stored: NUL removed (PostgreSQL refuses it in TEXT), at most `max`
/// characters.
fn text(s: &str, max: usize) -> String {
    s.chars().filter(|c| *c != '\0').take(max).collect()
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

fn nonneg(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

#[cfg(test)]
mod tests;
