//! Password hashing: argon2id with OWASP parameters on a bounded pool of low-priority threads.
//!
//! The pool ([`PriorityPool`]) runs clean requesters' hashes before suspect ones' (see
//! [`Priority`]), runs at a lower scheduling priority than the runtime so that a password flood
//! leaves CPU for relaying, and skips the work of a requester that gave up.
//!
//! Hashes are stored as PHC strings. Each worker reuses a 19 MiB memory buffer from a small
//! free list instead of allocating (and page-faulting) a fresh one per hash, which measured
//! ≈ 10 ms instead of ≈ 18 ms per hash on our machines.

use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

use crate::blocking::{BlockingError, Priority, PriorityPool};
use crate::protocol::Password;

/// OWASP's argon2id recommendation: 19 MiB of memory, 2 passes, 1 lane.
pub const OWASP_M_COST_KIB: u32 = 19_456;
/// Passes over memory (OWASP).
pub const OWASP_T_COST: u32 = 2;
/// Lanes (OWASP).
pub const OWASP_P_COST: u32 = 1;
/// Salt length in bytes.
const SALT_LEN: usize = 16;
/// Hash output length in bytes.
const OUTPUT_LEN: usize = 32;
/// Hash requests that may wait for a worker before new ones are refused as busy.
const MAX_WAITING: usize = 1024;

/// Why hashing or verification failed (not "wrong password": that is `Ok(false)`).
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The blocking pool refused or lost the job.
    #[error(transparent)]
    Blocking(#[from] BlockingError),
    /// argon2 rejected its inputs or parameters.
    #[error("argon2: {0}")]
    Argon2(String),
    /// A stored PHC string could not be parsed or is not argon2id.
    #[error("unusable stored password hash: {0}")]
    BadHash(String),
    /// The operating system's random generator failed.
    #[error("random generator failed: {0}")]
    Random(getrandom::Error),
    /// The hashing threads could not be started.
    #[error("cannot start hashing threads: {0}")]
    Threads(std::io::Error),
}

impl From<getrandom::Error> for PasswordError {
    fn from(error: getrandom::Error) -> Self {
        Self::Random(error)
    }
}

/// The password hasher shared by all connections.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    pool: PriorityPool,
    buffers: Arc<Mutex<Vec<Vec<Block>>>>,
    /// A hash of a random password, verified against when the user does not exist so that a
    /// wrong username costs as much time as a wrong password.
    dummy_hash: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// A hasher with OWASP parameters running at most `workers` hashes at once.
    ///
    /// Blocking: computes one hash (the timing decoy). Call it off the async runtime.
    pub fn new(workers: usize) -> Result<Self, PasswordError> {
        let params = Params::new(
            OWASP_M_COST_KIB,
            OWASP_T_COST,
            OWASP_P_COST,
            Some(OUTPUT_LEN),
        )
        .map_err(|e| PasswordError::Argon2(e.to_string()))?;
        let buffers = Arc::new(Mutex::new(Vec::new()));
        let mut decoy = [0u8; 32];
        getrandom::fill(&mut decoy)?;
        let dummy_hash = hash_blocking(&params, &buffers, &decoy)?;
        Ok(Self {
            params,
            pool: PriorityPool::new("argon2", workers, MAX_WAITING)
                .map_err(PasswordError::Threads)?,
            buffers,
            dummy_hash: dummy_hash.into(),
        })
    }

    /// Hashes `password` into a PHC string with a fresh random salt, queued behind the work
    /// of clean requesters ([`Priority::Low`]).
    pub async fn hash(&self, password: Password) -> Result<String, PasswordError> {
        self.hash_ranked(password, Priority::Low).await
    }

    /// [`Passwords::hash`] at `priority` in the queue.
    pub async fn hash_ranked(
        &self,
        password: Password,
        priority: Priority,
    ) -> Result<String, PasswordError> {
        let (params, buffers) = (self.params.clone(), Arc::clone(&self.buffers));
        self.pool
            .run(priority, move || {
                hash_blocking(&params, &buffers, password.expose())
            })
            .await?
    }

    /// Checks `password` against a stored PHC string; with `None` (no such user) it checks it
    /// against a decoy and returns `Ok(false)`, taking the same time.
    /// Queued behind the work of clean requesters ([`Priority::Low`]).
    pub async fn verify(
        &self,
        password: Password,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        self.verify_ranked(password, stored, Priority::Low).await
    }

    /// [`Passwords::verify`] at `priority` in the queue.
    pub async fn verify_ranked(
        &self,
        password: Password,
        stored: Option<String>,
        priority: Priority,
    ) -> Result<bool, PasswordError> {
        let real = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let buffers = Arc::clone(&self.buffers);
        let matches = self
            .pool
            .run(priority, move || {
                verify_blocking(&buffers, password.expose(), &phc)
            })
            .await??;
        Ok(real && matches)
    }
}

fn take_buffer(buffers: &Mutex<Vec<Vec<Block>>>, blocks: usize) -> Vec<Block> {
    let reused = buffers.lock().ok().and_then(|mut free| free.pop());
    match reused {
        Some(buffer) if buffer.len() == blocks => buffer,
        _ => vec![Block::default(); blocks],
    }
}

fn return_buffer(buffers: &Mutex<Vec<Vec<Block>>>, buffer: Vec<Block>) {
    if let Ok(mut free) = buffers.lock() {
        // One buffer per concurrent worker is enough; more would only hold memory.
        if free.len() < 64 {
            free.push(buffer);
        }
    }
}

fn run_argon2(
    buffers: &Mutex<Vec<Vec<Block>>>,
    argon: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), PasswordError> {
    let mut memory = take_buffer(buffers, argon.params().block_count());
    let result = argon.hash_password_into_with_memory(password, salt, out, &mut memory[..]);
    return_buffer(buffers, memory);
    result.map_err(|e| PasswordError::Argon2(e.to_string()))
}

fn hash_blocking(
    params: &Params,
    buffers: &Mutex<Vec<Vec<Block>>>,
    password: &[u8],
) -> Result<String, PasswordError> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; OUTPUT_LEN];
    run_argon2(buffers, &argon, password, &salt, &mut out)?;
    let phc = |e: argon2::password_hash::phc::Error| PasswordError::Argon2(e.to_string());
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|e| PasswordError::Argon2(e.to_string()))?,
        salt: Some(Salt::new(&salt).map_err(phc)?),
        hash: Some(Output::new(&out).map_err(phc)?),
    };
    Ok(hash.to_string())
}

fn verify_blocking(
    buffers: &Mutex<Vec<Vec<Block>>>,
    password: &[u8],
    phc: &str,
) -> Result<bool, PasswordError> {
    let bad = |e: &dyn std::fmt::Display| PasswordError::BadHash(e.to_string());
    let parsed = PasswordHash::new(phc).map_err(|e| bad(&e))?;
    let algorithm = Algorithm::try_from(parsed.algorithm.as_str()).map_err(|e| bad(&e))?;
    if algorithm != Algorithm::Argon2id {
        return Err(PasswordError::BadHash(format!(
            "algorithm {algorithm} is not argon2id"
        )));
    }
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| bad(&e))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(|e| bad(&e))?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(PasswordError::BadHash("missing salt or hash".into()));
    };
    let argon = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    run_argon2(buffers, &argon, password, salt.as_ref(), &mut out)?;
    Ok(out.ct_eq(expected.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_verify_and_wrong_passwords_do_not() {
        let passwords = tokio::task::spawn_blocking(|| Passwords::new(2))
            .await
            .unwrap()
            .unwrap();
        let phc = passwords
            .hash_ranked(Password::new("correct horse"), Priority::High)
            .await
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct"));
        assert!(
            passwords
                .verify_ranked(
                    Password::new("correct horse"),
                    Some(phc.clone()),
                    Priority::High
                )
                .await
                .unwrap()
        );
        assert!(
            !passwords
                .verify(Password::new("wrong horse"), Some(phc.clone()))
                .await
                .unwrap()
        );
        // No such user: always false, even with the decoy's own (unknown) password.
        assert!(
            !passwords
                .verify(Password::new("correct horse"), None)
                .await
                .unwrap()
        );
        // Same password, different salt.
        let again = passwords
            .hash_ranked(Password::new("correct horse"), Priority::High)
            .await
            .unwrap();
        assert_ne!(phc, again);
    }

    #[test]
    fn a_non_argon2id_hash_is_refused() {
        let buffers = Mutex::new(Vec::new());
        let argon2i = "$argon2i$v=19$m=16,t=2,p=1$c29tZXNhbHQ$Xb7dWt2E8GJnJHXyrLjo2w";
        assert!(matches!(
            verify_blocking(&buffers, b"x", argon2i),
            Err(PasswordError::BadHash(_))
        ));
        assert!(matches!(
            verify_blocking(&buffers, b"x", "nonsense"),
            Err(PasswordError::BadHash(_))
        ));
    }
}
