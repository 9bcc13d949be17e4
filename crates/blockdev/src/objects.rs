//! User-creatable objects (`object-add`, `object-del`, `--object`): `iothread`, `secret` and
//! `throttle-group`, kept under `/objects` in QEMU's object tree, with the properties
//! `qom-get`/`qom-set` reach (see [`crate::qom`]).
//!
//! A throttle group's limits are the block layer's ([`block::throttle::ThrottleGroup`]): the
//! `throttle` nodes that name it share them. An iothread is an event loop in QEMU; here block
//! I/O runs on the daemon's I/O pool whatever the iothread, so its properties are settings
//! kept and shown, and naming one (`block-export-add iothread`) only requires it to exist.

use std::sync::Arc;

use base64::Engine;
use block::throttle::{Bucket, ThrottleConfig, ThrottleGroup, ThrottleGroups};
use qmp_api::{
    IothreadProperties, ObjectOptions, ObjectOptionsBranch, QCryptoSecretFormat, QmpError,
    SecretProperties, ThrottleGroupProperties, ThrottleLimits,
};
use serde_json::{Value, json};

/// An iothread's settings (QEMU's defaults).
#[derive(Debug, Clone)]
pub(crate) struct Iothread {
    poll_max_ns: i64,
    poll_grow: i64,
    poll_shrink: i64,
    aio_max_batch: i64,
    thread_pool_min: i64,
    thread_pool_max: i64,
}

impl Default for Iothread {
    fn default() -> Self {
        Iothread {
            poll_max_ns: 32768,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
            thread_pool_min: 0,
            thread_pool_max: 64,
        }
    }
}

/// The properties of an iothread, in the order QSD lists them.
const IOTHREAD_PROPERTIES: &[(&str, &str)] = &[
    ("type", "string"),
    ("thread-pool-min", "int"),
    ("aio-max-batch", "int"),
    ("thread-pool-max", "int"),
    ("poll-max-ns", "int"),
    ("poll-grow", "int"),
    ("poll-shrink", "int"),
];

impl Iothread {
    fn field(&mut self, name: &str) -> Option<&mut i64> {
        Some(match name {
            "poll-max-ns" => &mut self.poll_max_ns,
            "poll-grow" => &mut self.poll_grow,
            "poll-shrink" => &mut self.poll_shrink,
            "aio-max-batch" => &mut self.aio_max_batch,
            "thread-pool-min" => &mut self.thread_pool_min,
            "thread-pool-max" => &mut self.thread_pool_max,
            _ => return None,
        })
    }

    /// QEMU's setter: a non-negative integer.
    fn set(&mut self, name: &str, value: i64) -> Result<(), QmpError> {
        if value < 0 {
            return Err(QmpError::generic(format!(
                "{name} value must be in range [0, {}]",
                i64::MAX
            )));
        }
        if let Some(field) = self.field(name) {
            *field = value;
        }
        Ok(())
    }

    /// QEMU's check of the thread pool bounds.
    fn check_pool(&self) -> Result<(), QmpError> {
        if self.thread_pool_min > self.thread_pool_max {
            return Err(QmpError::generic(
                "bad thread-pool-min/thread-pool-max values",
            ));
        }
        Ok(())
    }

    fn from_options(p: &IothreadProperties) -> Result<Self, QmpError> {
        let mut t = Iothread::default();
        for (name, value) in [
            ("thread-pool-min", p.thread_pool_min),
            ("aio-max-batch", p.aio_max_batch),
            ("thread-pool-max", p.thread_pool_max),
            ("poll-max-ns", p.poll_max_ns),
            ("poll-grow", p.poll_grow),
            ("poll-shrink", p.poll_shrink),
        ] {
            if let Some(v) = value {
                t.set(name, v)?;
            }
        }
        t.check_pool()?;
        Ok(t)
    }

    fn get(&mut self, name: &str) -> Option<Value> {
        self.field(name).map(|v| json!(*v))
    }
}

/// A secret: its settings and the bytes they give.
#[derive(Debug, Clone)]
pub(crate) struct Secret {
    format: QCryptoSecretFormat,
    data: Option<String>,
    file: Option<String>,
    /// The secret itself (loaded at creation).
    bytes: Vec<u8>,
}

const SECRET_PROPERTIES: &[(&str, &str)] = &[
    ("type", "string"),
    ("iv", "string"),
    ("keyid", "string"),
    ("format", "QCryptoSecretFormat"),
    ("file", "string"),
    ("data", "string"),
];

impl Secret {
    fn from_options(p: &SecretProperties) -> Result<Self, QmpError> {
        if p.keyid.is_some() || p.iv.is_some() {
            // QEMU decrypts the data with AES-256-CBC using the key secret; blockjobd has no
            // AES and nothing here reads secrets, so encrypted secrets are refused by name.
            let name = if p.keyid.is_some() { "keyid" } else { "iv" };
            return Err(QmpError::generic(format!(
                "Parameter '{name}' is not supported: blockjobd does not decrypt secrets"
            )));
        }
        let format = p.format.unwrap_or(QCryptoSecretFormat::Raw);
        let raw = match (&p.data, &p.file) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'file' and 'data' are mutually exclusive",
                ));
            }
            (Some(data), None) => data.as_bytes().to_vec(),
            (None, Some(file)) => std::fs::read(file).map_err(|e| {
                QmpError::generic(format!(
                    "Unable to read {file}: Failed to open file \u{201c}{file}\u{201d}: {}",
                    job::strerror(&e)
                ))
            })?,
            (None, None) => {
                return Err(QmpError::generic(
                    "Either 'file' or 'data' must be provided",
                ));
            }
        };
        let bytes = match format {
            QCryptoSecretFormat::Raw => raw,
            QCryptoSecretFormat::Base64 => decode_base64(&raw)?,
        };
        Ok(Secret {
            format,
            data: p.data.clone(),
            file: p.file.clone(),
            bytes,
        })
    }

    fn get(&self, name: &str) -> Option<Value> {
        Some(match name {
            "format" => json!(self.format.as_str()),
            "data" => json!(self.data.clone().unwrap_or_default()),
            "file" => json!(self.file.clone().unwrap_or_default()),
            "keyid" | "iv" => json!(""),
            _ => return None,
        })
    }

    /// The secret's bytes.
    #[allow(dead_code)] // nothing in blockjobd consumes secrets yet (no TLS, no encryption)
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// QEMU's base64 decoding (strict, with its error text).
pub(crate) fn decode_base64(data: &[u8]) -> Result<Vec<u8>, QmpError> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| QmpError::generic("Base64 data contains invalid characters"))
}

/// The properties of a throttle group, in the order QSD lists them.
const THROTTLE_PROPERTIES: &[(&str, &str)] = &[
    ("type", "string"),
    ("x-bps-write-max-length", "int"),
    ("x-iops-total-max-length", "int"),
    ("x-iops-size", "int"),
    ("limits", "ThrottleLimits"),
    ("x-bps-total", "int"),
    ("x-iops-read-max-length", "int"),
    ("x-bps-write", "int"),
    ("x-iops-write-max-length", "int"),
    ("x-bps-read-max", "int"),
    ("x-iops-read-max", "int"),
    ("x-bps-total-max", "int"),
    ("x-bps-read-max-length", "int"),
    ("x-iops-read", "int"),
    ("x-bps-read", "int"),
    ("x-bps-write-max", "int"),
    ("x-iops-total-max", "int"),
    ("x-iops-total", "int"),
    ("x-iops-write", "int"),
    ("x-bps-total-max-length", "int"),
    ("x-iops-write-max", "int"),
];

/// What an `x-` throttle property sets.
enum ThrottleField {
    Avg(Bucket),
    Max(Bucket),
    Length(Bucket),
    OpSize,
}

fn throttle_field(name: &str) -> Option<ThrottleField> {
    let rest = name.strip_prefix("x-")?;
    if rest == "iops-size" {
        return Some(ThrottleField::OpSize);
    }
    let (kind, rest) = rest.split_once('-')?;
    let (dir, suffix) = match rest.split_once('-') {
        Some((dir, suffix)) => (dir, Some(suffix)),
        None => (rest, None),
    };
    let bucket = match (kind, dir) {
        ("bps", "total") => Bucket::BpsTotal,
        ("bps", "read") => Bucket::BpsRead,
        ("bps", "write") => Bucket::BpsWrite,
        ("iops", "total") => Bucket::OpsTotal,
        ("iops", "read") => Bucket::OpsRead,
        ("iops", "write") => Bucket::OpsWrite,
        _ => return None,
    };
    match suffix {
        None => Some(ThrottleField::Avg(bucket)),
        Some("max") => Some(ThrottleField::Max(bucket)),
        Some("max-length") => Some(ThrottleField::Length(bucket)),
        _ => None,
    }
}

fn throttle_get(config: &ThrottleConfig, name: &str) -> Option<Value> {
    if name == "limits" {
        return serde_json::to_value(config.limits()).ok();
    }
    Some(match throttle_field(name)? {
        ThrottleField::Avg(b) => json!(config.buckets[b as usize].avg as i64),
        ThrottleField::Max(b) => json!(config.buckets[b as usize].max as i64),
        ThrottleField::Length(b) => json!(config.buckets[b as usize].burst_length),
        ThrottleField::OpSize => json!(config.op_size),
    })
}

/// QEMU's setter of an `x-` property (before the group is complete).
fn throttle_set_x(config: &mut ThrottleConfig, name: &str, value: i64) -> Result<(), QmpError> {
    if value < 0 {
        return Err(QmpError::generic("Property values cannot be negative"));
    }
    match throttle_field(name) {
        Some(ThrottleField::Avg(b)) => config.buckets[b as usize].avg = value as f64,
        Some(ThrottleField::Max(b)) => config.buckets[b as usize].max = value as f64,
        Some(ThrottleField::Length(b)) => {
            if value > i64::from(u32::MAX) {
                return Err(QmpError::generic(format!(
                    "{name} value must be in the range [0, {}]",
                    u32::MAX
                )));
            }
            config.buckets[b as usize].burst_length = value as u64;
        }
        Some(ThrottleField::OpSize) => config.op_size = value as u64,
        None => {}
    }
    Ok(())
}

fn throttle_config(p: &ThrottleGroupProperties) -> Result<ThrottleConfig, QmpError> {
    let mut config = ThrottleConfig::default();
    if let Some(limits) = &p.limits {
        config.apply_limits(limits).map_err(QmpError::generic)?;
    }
    for (name, value) in [
        ("x-iops-total", p.x_iops_total),
        ("x-iops-total-max", p.x_iops_total_max),
        ("x-iops-total-max-length", p.x_iops_total_max_length),
        ("x-iops-read", p.x_iops_read),
        ("x-iops-read-max", p.x_iops_read_max),
        ("x-iops-read-max-length", p.x_iops_read_max_length),
        ("x-iops-write", p.x_iops_write),
        ("x-iops-write-max", p.x_iops_write_max),
        ("x-iops-write-max-length", p.x_iops_write_max_length),
        ("x-bps-total", p.x_bps_total),
        ("x-bps-total-max", p.x_bps_total_max),
        ("x-bps-total-max-length", p.x_bps_total_max_length),
        ("x-bps-read", p.x_bps_read),
        ("x-bps-read-max", p.x_bps_read_max),
        ("x-bps-read-max-length", p.x_bps_read_max_length),
        ("x-bps-write", p.x_bps_write),
        ("x-bps-write-max", p.x_bps_write_max),
        ("x-bps-write-max-length", p.x_bps_write_max_length),
        ("x-iops-size", p.x_iops_size),
    ] {
        if let Some(value) = value {
            throttle_set_x(&mut config, name, value)?;
        }
    }
    Ok(config)
}

/// One object under `/objects`.
pub(crate) enum ObjectKind {
    Iothread(Iothread),
    Secret(Secret),
    ThrottleGroup(Arc<ThrottleGroup>),
}

impl ObjectKind {
    /// The QOM type name.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            ObjectKind::Iothread(_) => "iothread",
            ObjectKind::Secret(_) => "secret",
            ObjectKind::ThrottleGroup(_) => "throttle-group",
        }
    }

    /// The properties, in the order QSD lists them (`qom-list`).
    pub(crate) fn properties(&self) -> &'static [(&'static str, &'static str)] {
        type_properties(self.type_name()).unwrap_or(&[])
    }

    /// A property's value (`qom-get`); `None`: no such property.
    pub(crate) fn get(&mut self, name: &str) -> Option<Value> {
        if name == "type" {
            return Some(json!(self.type_name()));
        }
        match self {
            ObjectKind::Iothread(t) => t.get(name),
            ObjectKind::Secret(s) => s.get(name),
            ObjectKind::ThrottleGroup(g) => throttle_get(&g.config(), name),
        }
    }

    /// Sets a property (`qom-set`), as QEMU's setters do once the object is complete.
    pub(crate) fn set(&mut self, name: &str, value: &Value) -> Result<(), QmpError> {
        let int = || {
            value.as_i64().ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer"
                ))
            })
        };
        let string = || {
            value.as_str().map(str::to_string).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: string"
                ))
            })
        };
        match self {
            ObjectKind::Iothread(t) => {
                let mut next = t.clone();
                next.set(name, int()?)?;
                if name.starts_with("thread-pool") {
                    next.check_pool()?;
                }
                *t = next;
            }
            ObjectKind::Secret(s) => match name {
                // QEMU keeps the loaded secret; only the property changes.
                "data" => s.data = Some(string()?),
                "file" => s.file = Some(string()?),
                "format" => {
                    let text = string()?;
                    s.format = text.parse().map_err(|_| {
                        QmpError::generic(format!(
                            "Parameter '{name}' does not accept value '{text}'"
                        ))
                    })?;
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{name}' is not supported: blockjobd does not decrypt secrets"
                    )));
                }
            },
            ObjectKind::ThrottleGroup(g) => {
                if name != "limits" {
                    return Err(QmpError::generic(
                        "Property cannot be set after initialization",
                    ));
                }
                let limits: ThrottleLimits =
                    qmp_api::input::from_value(value).map_err(|e| QmpError::generic(e.desc))?;
                let mut config = g.config();
                config.apply_limits(&limits).map_err(QmpError::generic)?;
                g.set_config(config);
            }
        }
        Ok(())
    }
}

/// The properties of a type, for `qom-list-properties` (`None`: we do not have the type).
pub(crate) fn type_properties(type_name: &str) -> Option<&'static [(&'static str, &'static str)]> {
    match type_name {
        "iothread" => Some(IOTHREAD_PROPERTIES),
        "secret" => Some(SECRET_PROPERTIES),
        "throttle-group" => Some(THROTTLE_PROPERTIES),
        _ => None,
    }
}

/// The objects under `/objects`, in creation order.
pub(crate) struct Objects {
    list: Vec<(String, ObjectKind)>,
    groups: ThrottleGroups,
}

impl Objects {
    /// Throttle groups registered in `groups`, which the graph's `throttle` driver reads.
    pub(crate) fn new(groups: ThrottleGroups) -> Self {
        Objects {
            list: Vec::new(),
            groups,
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &ObjectKind)> {
        self.list.iter().map(|(id, o)| (id.as_str(), o))
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut ObjectKind> {
        self.list.iter_mut().find(|(i, _)| i == id).map(|(_, o)| o)
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.list.iter().any(|(i, _)| i == id)
    }

    /// Whether `id` is an iothread.
    pub(crate) fn is_iothread(&self, id: &str) -> bool {
        self.list
            .iter()
            .any(|(i, o)| i == id && matches!(o, ObjectKind::Iothread(_)))
    }

    /// `object-add`: QEMU's checks in its order (the id, the properties, a duplicate, then
    /// completion).
    pub(crate) fn add(&mut self, options: ObjectOptions) -> Result<(), QmpError> {
        let id = options.id;
        if !job::id_wellformed(&id) {
            return Err(QmpError::generic("Parameter 'id' expects an identifier"));
        }
        // Properties first (setters), then the duplicate check, then completion.
        enum Pending {
            Iothread(IothreadProperties),
            Secret(SecretProperties),
            Throttle(ThrottleConfig),
        }
        let pending = match options.branch {
            ObjectOptionsBranch::Iothread(p) => {
                for (name, value) in [
                    ("thread-pool-min", p.thread_pool_min),
                    ("aio-max-batch", p.aio_max_batch),
                    ("thread-pool-max", p.thread_pool_max),
                    ("poll-max-ns", p.poll_max_ns),
                    ("poll-grow", p.poll_grow),
                    ("poll-shrink", p.poll_shrink),
                ] {
                    if let Some(v) = value {
                        Iothread::default().set(name, v)?;
                    }
                }
                Pending::Iothread(p)
            }
            ObjectOptionsBranch::Secret(p) => Pending::Secret(p),
            ObjectOptionsBranch::ThrottleGroup(p) => Pending::Throttle(throttle_config(&p)?),
        };
        if self.contains(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let object = match pending {
            Pending::Iothread(p) => ObjectKind::Iothread(Iothread::from_options(&p)?),
            Pending::Secret(p) => ObjectKind::Secret(Secret::from_options(&p)?),
            Pending::Throttle(config) => {
                config.check().map_err(QmpError::generic)?;
                let group = Arc::new(ThrottleGroup::new(&id, config));
                self.groups.insert(Arc::clone(&group));
                ObjectKind::ThrottleGroup(group)
            }
        };
        self.list.push((id, object));
        Ok(())
    }

    /// `object-del`: refused while a node uses the throttle group.
    pub(crate) fn del(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(at) = self.list.iter().position(|(i, _)| i == id) else {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        };
        if let ObjectKind::ThrottleGroup(g) = &self.list[at].1
            && g.in_use()
        {
            return Err(QmpError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        if let (_, ObjectKind::ThrottleGroup(_)) = self.list.remove(at) {
            self.groups.remove(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(objects: &mut Objects, options: Value) -> Result<(), QmpError> {
        let options: ObjectOptions = qmp_api::input::from_value(&options)?;
        objects.add(options)
    }

    #[test]
    fn throttle_x_members_parse() {
        assert!(matches!(
            throttle_field("x-bps-write-max-length"),
            Some(ThrottleField::Length(Bucket::BpsWrite))
        ));
        assert!(matches!(
            throttle_field("x-iops-total"),
            Some(ThrottleField::Avg(Bucket::OpsTotal))
        ));
        assert!(matches!(
            throttle_field("x-iops-size"),
            Some(ThrottleField::OpSize)
        ));
        assert!(throttle_field("limits").is_none());
    }

    #[test]
    fn add_and_delete_with_qemu_errors() {
        let groups = ThrottleGroups::default();
        let mut objects = Objects::new(groups.clone());
        add(&mut objects, json!({"qom-type": "iothread", "id": "io0"})).unwrap();
        let e = add(&mut objects, json!({"qom-type": "iothread", "id": "io0"})).unwrap_err();
        assert_eq!(
            e.desc,
            "attempt to add duplicate property 'io0' to object (type 'container')"
        );
        let e = add(
            &mut objects,
            json!({"qom-type": "throttle-group", "id": "t", "x-bps-total": -1}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Property values cannot be negative");
        add(
            &mut objects,
            json!({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": 10}}),
        )
        .unwrap();
        let group = groups.get("tg").expect("registered for the graph");
        group.join();
        assert_eq!(
            objects.del("tg").unwrap_err().desc,
            "object 'tg' is in use, can not be deleted"
        );
        group.leave();
        objects.del("tg").unwrap();
        assert!(groups.get("tg").is_none());
        assert_eq!(objects.del("tg").unwrap_err().desc, "object 'tg' not found");
        let e = add(&mut objects, json!({"qom-type": "secret", "id": "s"})).unwrap_err();
        assert_eq!(e.desc, "Either 'file' or 'data' must be provided");
        add(
            &mut objects,
            json!({"qom-type": "secret", "id": "s", "data": "aGVsbG8=", "format": "base64"}),
        )
        .unwrap();
        match objects.get_mut("s") {
            Some(ObjectKind::Secret(s)) => assert_eq!(s.bytes(), b"hello"),
            _ => panic!("secret missing"),
        }
    }
}
