//! Rate limiting for log lines a client can trigger: at most
//! `per_second` a second; the rest are counted and reported with the
//! next line allowed. The limiters are shared by every connection of
//! the process (`client_errors`, `connection_lines`), so many clients
//! cannot flood the log either.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

pub struct LogLimiter {
    per_second: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    pub fn new(per_second: u32) -> Self {
        LogLimiter {
            per_second,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed_since_last)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.per_second {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

/// The limiter of every client-triggered warning in the process.
pub fn client_errors() -> &'static LogLimiter {
    static L: LazyLock<LogLimiter> = LazyLock::new(|| LogLimiter::new(10));
    &L
}

/// The limiter of the lines logged as clients connect and leave.
pub fn connection_lines() -> &'static LogLimiter {
    static L: LazyLock<LogLimiter> = LazyLock::new(|| LogLimiter::new(20));
    &L
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_counts() {
        let l = LogLimiter::new(2);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(1050));
        assert_eq!(l.allow(), Some(2));
    }
}
