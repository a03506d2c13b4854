//! Kernel parameters under `/proc/sys`: the forwarding switches and per-interface reverse-path filtering the worker
//! needs. Every read and write acts on the network namespace of the calling thread (that is how `/proc/sys/net` is
//! resolved), so call these from the thread whose namespace you mean.

use std::path::PathBuf;

use crate::netlink::PlumbError;

/// `/proc/sys/<key with '.' turned into '/'>`, refusing keys that could name anything outside `/proc/sys`.
fn path_of(key: &str) -> Result<PathBuf, PlumbError> {
    let valid = !key.is_empty()
        && !key.contains("..")
        && !key.contains('/')
        && !key.contains('\0')
        && key.split('.').all(|part| !part.is_empty());
    if !valid {
        return Err(PlumbError::SysctlKey(key.to_owned()));
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

/// Writes `value` to the dotted sysctl `key` (e.g. `net.ipv4.ip_forward`).
pub fn set(key: &str, value: &str) -> Result<(), PlumbError> {
    let path = path_of(key)?;
    std::fs::write(&path, value).map_err(|source| PlumbError::SysctlWrite {
        key: key.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Reads the dotted sysctl `key`, without the trailing newline.
pub fn get(key: &str) -> Result<String, PlumbError> {
    let path = path_of(key)?;
    let text = std::fs::read_to_string(&path).map_err(|source| PlumbError::SysctlRead {
        key: key.to_owned(),
        source,
    })?;
    Ok(text.trim_end_matches('\n').to_owned())
}

/// Enables IPv4 and IPv6 forwarding and sets loose reverse-path filtering (`rp_filter=2`) on exactly `ifaces`. The
/// `all` entry is left alone: the kernel applies the larger of `all` and the interface's value, and 2 (loose) is the
/// largest, so our interfaces are loose whatever `all` says while filtering elsewhere on the host stays as set.
/// Every interface name is checked before anything is written.
pub fn host_forwarding_and_rp_filter(ifaces: &[&str]) -> Result<(), PlumbError> {
    let keys = ifaces
        .iter()
        .map(|iface| rp_filter_key(iface))
        .collect::<Result<Vec<_>, _>>()?;
    set("net.ipv4.ip_forward", "1")?;
    set("net.ipv6.conf.all.forwarding", "1")?;
    for key in keys {
        set(&key, "2")?;
    }
    Ok(())
}

/// `net.ipv4.conf.<iface>.rp_filter`; a name with a '.' would be read as a path separator (none of ours has one).
fn rp_filter_key(iface: &str) -> Result<String, PlumbError> {
    let key = format!("net.ipv4.conf.{iface}.rp_filter");
    if iface.is_empty() || iface.contains('.') {
        return Err(PlumbError::SysctlKey(key));
    }
    path_of(&key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_proc_sys_paths() {
        assert_eq!(
            path_of("net.ipv4.ip_forward").ok(),
            Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
        assert_eq!(
            path_of("net.ipv4.conf.goProxyBridge.rp_filter").ok(),
            Some(PathBuf::from("/proc/sys/net/ipv4/conf/goProxyBridge/rp_filter"))
        );
    }

    #[test]
    fn escaping_keys_are_refused() {
        for bad in [
            "",
            "..",
            "net..ipv4",
            "net/ipv4/ip_forward",
            "net.ipv4.",
            ".net",
            "a.b\0c",
        ] {
            assert!(matches!(path_of(bad), Err(PlumbError::SysctlKey(_))), "{bad:?}");
        }
        // Checked without writing: unit tests run in the host's namespace and must not change it.
        assert!(matches!(rp_filter_key("eth0.100"), Err(PlumbError::SysctlKey(_))));
        assert!(matches!(rp_filter_key(""), Err(PlumbError::SysctlKey(_))));
        assert_eq!(
            rp_filter_key("goProxyTun").ok().as_deref(),
            Some("net.ipv4.conf.goProxyTun.rp_filter")
        );
    }
}
