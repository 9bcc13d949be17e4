//! The timer behind `cache-clean-interval` (QEMU's `cache_clean_timer`): one thread for
//! every image, started with the first registration, sleeping until the next image is due.
//! It only frees memory; nothing orders events by it.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::image::Image;

struct Entry {
    image: Weak<Image>,
    interval: Duration,
    due: Instant,
}

#[derive(Default)]
struct Cleaner {
    entries: Mutex<Vec<Entry>>,
    changed: Condvar,
}

fn cleaner() -> &'static Arc<Cleaner> {
    static CLEANER: OnceLock<Arc<Cleaner>> = OnceLock::new();
    CLEANER.get_or_init(|| {
        let cleaner = Arc::new(Cleaner::default());
        let worker = Arc::clone(&cleaner);
        let spawned = std::thread::Builder::new()
            .name("qcow2-cache-clean".into())
            .spawn(move || worker.run());
        if let Err(e) = spawned {
            // Caches are then never cleaned: memory stays bounded by their sizes.
            eprintln!("qcow2: cannot start the cache-clean thread: {e}");
        }
        cleaner
    })
}

/// Cleans `image`'s caches every `interval` from now on (`None` or zero: never), replacing an
/// earlier registration of the same image.
pub(crate) fn register(image: Weak<Image>, interval: Option<Duration>) {
    let c = cleaner();
    let mut entries = c.entries.lock().unwrap_or_else(|e| e.into_inner());
    entries.retain(|e| e.image.strong_count() > 0 && !e.image.ptr_eq(&image));
    if let Some(interval) = interval.filter(|i| !i.is_zero()) {
        entries.push(Entry {
            image,
            interval,
            due: Instant::now() + interval,
        });
    }
    c.changed.notify_all();
}

impl Cleaner {
    fn run(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            entries.retain(|e| e.image.strong_count() > 0);
            for e in entries.iter_mut() {
                if e.due <= now {
                    due.push(e.image.clone());
                    e.due = now + e.interval;
                }
            }
            if !due.is_empty() {
                drop(entries);
                for image in due.iter().filter_map(Weak::upgrade) {
                    image.clean_unused_tables();
                }
                entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let next = entries.iter().map(|e| e.due).min();
            entries = match next {
                None => self
                    .changed
                    .wait(entries)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(next) => {
                    let left = next.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(entries, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}
