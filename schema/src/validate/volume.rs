//! Volume rules: size, format per pool type, image sources, templates and clones.

use super::{at, check_abs_path, pool_spec, volume_spec};
use crate::kinds::*;
use crate::load::Diagnostic;
use crate::resource::{Desired, Kind, Resource, Spec};

/// A Volume: size, pool content and type, source, clone, template deletion.
pub(super) fn check_volume(
    r: &Resource,
    v: &VolumeSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    if v.size.0 == 0 {
        out.push(at(r, "/spec/size", "size must be greater than zero", None));
    }
    if let Some(p) = pool_spec(desired, v.pool.as_str()) {
        check_volume_pool(r, v, p, out);
    }
    if let Some(src) = &v.source {
        check_volume_source(r, src, out);
    }
    if let Some(c) = &v.clone {
        check_volume_clone(r, v, c, desired, out);
    }
    check_template_deletion(r, v, desired, out);
}

/// The pool takes volumes, and a format its type can hold.
fn check_volume_pool(r: &Resource, v: &VolumeSpec, p: &StoragePoolSpec, out: &mut Vec<Diagnostic>) {
    if !p
        .content
        .iter()
        .any(|c| matches!(c, Content::Images | Content::Rootdir | Content::Iso))
    {
        out.push(at(
            r,
            "/spec/pool",
            format!(
                "pool {} does not allow images, rootdir or iso content",
                v.pool
            ),
            None,
        ));
    }
    if v.format == VolumeFormat::Qcow2 && matches!(p.pool_type, PoolType::Lvmthin | PoolType::Zfs) {
        out.push(at(
            r,
            "/spec/format",
            format!(
                "qcow2 is a file format; pool {} ({}) holds volumes as block devices",
                v.pool,
                p.pool_type.as_str()
            ),
            Some("use format: raw on lvmthin and zfs pools, or put the volume on a dir or btrfs pool"),
        ));
    }
}

/// Exactly one of `file` or `url`; a URL is http(s) and has its digest.
fn check_volume_source(r: &Resource, src: &VolumeSource, out: &mut Vec<Diagnostic>) {
    match (&src.file, &src.url) {
        (Some(_), Some(_)) => out.push(at(
            r,
            "/spec/source",
            "source needs exactly one of file or url (both given)",
            None,
        )),
        (None, None) => out.push(at(
            r,
            "/spec/source",
            "source needs exactly one of file or url (neither given)",
            Some("add file: /path/to/image, or url: https://… with its sha256"),
        )),
        _ => {}
    }
    if let Some(f) = &src.file {
        check_abs_path(r, "/spec/source/file", f, "source file", out);
    }
    if let Some(u) = &src.url {
        if let Err(why) = check_image_url(u) {
            out.push(at(r, "/spec/source/url", format!("url {why}"), None));
        }
        if src.sha256.is_none() {
            out.push(at(
                r,
                "/spec/source/url",
                "an image URL is never fetched without its digest: sha256 is required",
                Some("add sha256: <64 hex digits>: the image's SHA256SUMS entry, or `sha256sum` of a copy you verified"),
            ));
        }
    }
    if let Some(d) = &src.sha256
        && !(d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        let hint = (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some("write the digest in lowercase");
        out.push(at(
            r,
            "/spec/source/sha256",
            format!(
                "sha256 must be 64 lowercase hex digits ({} characters given)",
                d.chars().count()
            ),
            hint,
        ));
    }
}

/// `http://` or `https://`, a host, no whitespace.
fn check_image_url(u: &str) -> Result<(), String> {
    let Some(rest) = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
    else {
        return Err(format!("{u:?} must start with http:// or https://"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{u:?} names no host"));
    }
    if u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{u:?} contains whitespace (percent-encode it as %20)"
        ));
    }
    Ok(())
}

/// A clone: no source of its own, the same pool as its source, not smaller, and a
/// linked clone only where the pool can share blocks.
fn check_volume_clone(
    r: &Resource,
    v: &VolumeSpec,
    c: &VolumeClone,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    if v.source.is_some() {
        out.push(at(
            r,
            "/spec/source",
            format!(
                "a clone takes its content from Volume/{}; it has no source",
                c.from
            ),
            Some("remove source, or remove clone"),
        ));
    }
    if let Some(from) = volume_spec(desired, c.from.as_str()) {
        if from.pool != v.pool {
            out.push(at(
                r,
                "/spec/clone/from",
                format!(
                    "Volume/{} is in pool {}, not {}: a clone lives in the pool of its source",
                    c.from, from.pool, v.pool
                ),
                Some(&format!("set pool: {}", from.pool)),
            ));
        }
        if v.size < from.size {
            out.push(at(
                r,
                "/spec/size",
                format!(
                    "size {} is smaller than Volume/{}'s {}: a clone cannot shrink its source",
                    v.size, c.from, from.size
                ),
                Some(&format!("set size: {} or more", from.size)),
            ));
        }
    }
    if c.linked {
        check_linked_clone(r, v, c, desired, out);
    }
}

/// A linked clone is a qcow2 file over its source (dir, nfs) or a btrfs reflink (same
/// format as its source); a qcow2 clone's source must be a template, or writes to it
/// would show in the clone.
fn check_linked_clone(
    r: &Resource,
    v: &VolumeSpec,
    c: &VolumeClone,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    let Some(p) = pool_spec(desired, v.pool.as_str()) else {
        return;
    };
    let from = volume_spec(desired, c.from.as_str());
    match p.pool_type {
        PoolType::Btrfs => {
            if let Some(f) = from.filter(|f| f.pool == v.pool && f.format != v.format) {
                out.push(at(
                    r,
                    "/spec/format",
                    format!(
                        "a linked clone on btrfs pool {} is a reflink copy of Volume/{}, so it has its format ({})",
                        v.pool,
                        c.from,
                        format_name(f.format)
                    ),
                    Some(&format!(
                        "set format: {}, or linked: false for a converted full copy",
                        format_name(f.format)
                    )),
                ));
            }
        }
        PoolType::Dir | PoolType::Nfs => {
            if v.format != VolumeFormat::Qcow2 {
                out.push(at(
                    r,
                    "/spec/clone",
                    format!(
                        "a linked clone on {} pool {} is a qcow2 file over its source, so it needs format: qcow2",
                        p.pool_type.as_str(),
                        v.pool
                    ),
                    Some(&format!(
                        "set format: qcow2, or clone: {{from: {}, linked: false}} for a full copy",
                        c.from
                    )),
                ));
            }
            if from.is_some_and(|f| !f.template) {
                out.push(at(
                    r,
                    "/spec/clone/from",
                    format!(
                        "Volume/{} is not a template: a linked clone reads its blocks, so nothing may write to it",
                        c.from
                    ),
                    Some(&format!(
                        "set template: true on Volume/{}, or linked: false for a full copy",
                        c.from
                    )),
                ));
            }
        }
        PoolType::Lvmthin | PoolType::Zfs => out.push(at(
            r,
            "/spec/clone",
            format!(
                "linked clones need a dir pool (qcow2 backing file) or a btrfs pool (reflink); pool {} is {}",
                v.pool,
                p.pool_type.as_str()
            ),
            Some("use linked: false for a full copy, or a dir or btrfs pool"),
        )),
    }
}

/// A template that clones in the manifests still use cannot be set to be deleted.
fn check_template_deletion(
    r: &Resource,
    v: &VolumeSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    if !v.template || v.deletion_policy != DeletionPolicy::Delete {
        return;
    }
    let clones: Vec<String> = desired
        .resources
        .values()
        .filter(|o| o.id.kind == Kind::Volume)
        .filter(|o| match &o.spec {
            Spec::Volume(ov) => ov
                .clone
                .as_ref()
                .is_some_and(|c| c.from.as_str() == r.id.name),
            _ => false,
        })
        .map(|o| o.id.to_string())
        .collect();
    if !clones.is_empty() {
        out.push(at(
            r,
            "/spec/deletionPolicy",
            format!(
                "{} is a template with clones ({}): a template with clones cannot be deleted",
                r.id,
                clones.join(", ")
            ),
            Some("use deletionPolicy: Retain, or delete the clones first"),
        ));
    }
}

/// The manifest spelling of a volume format.
fn format_name(f: VolumeFormat) -> &'static str {
    match f {
        VolumeFormat::Raw => "raw",
        VolumeFormat::Qcow2 => "qcow2",
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{diagnostics, doc};

    const SHA: &str = "sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn sources() {
        let text = doc("StoragePool", "local", &["type: dir", "path: /p"])
            + &doc(
                "Volume",
                "none",
                &["pool: local", "size: 1Gi", "source: {}"],
            )
            + &doc(
                "Volume",
                "both",
                &[
                    "pool: local",
                    "size: 1Gi",
                    "source: {file: /i.img, url: 'https://x/i.img', sha256: abc}",
                ],
            )
            + &doc(
                "Volume",
                "ftp",
                &["pool: local", "size: 1Gi", "source: {url: 'ftp://x/i.img'}"],
            )
            + &doc(
                "Volume",
                "upper",
                &[
                    "pool: local",
                    "size: 1Gi",
                    "source: {url: 'https://x/a b.img', sha256: 0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF}",
                ],
            )
            + &doc(
                "Volume",
                "nohost",
                &["pool: local", "size: 1Gi", "source: {url: 'http:///i.img'}"],
            )
            + &doc(
                "Volume",
                "good",
                &[
                    "pool: local",
                    "size: 1Gi",
                    "format: qcow2",
                    "source:",
                    "  url: https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
                    &format!("  {SHA}"),
                ],
            )
            + &doc(
                "Volume",
                "local",
                &[
                    "pool: local",
                    "size: 1Gi",
                    "source:",
                    "  file: /srv/images/debian.qcow2",
                    &format!("  {SHA}"),
                ],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:15:3: Volume/none spec.source: source needs exactly one of file or url (neither given) (hint: add file: /path/to/image, or url: https://… with its sha256)",
                "m.yaml:23:3: Volume/both spec.source: source needs exactly one of file or url (both given)",
                "m.yaml:23:58: Volume/both spec.source.sha256: sha256 must be 64 lowercase hex digits (3 characters given)",
                "m.yaml:31:17: Volume/ftp spec.source.url: url \"ftp://x/i.img\" must start with http:// or https://",
                "m.yaml:31:17: Volume/ftp spec.source.url: an image URL is never fetched without its digest: sha256 is required (hint: add sha256: <64 hex digits>: the image's SHA256SUMS entry, or `sha256sum` of a copy you verified)",
                "m.yaml:39:17: Volume/upper spec.source.url: url \"https://x/a b.img\" contains whitespace (percent-encode it as %20)",
                "m.yaml:39:46: Volume/upper spec.source.sha256: sha256 must be 64 lowercase hex digits (64 characters given) (hint: write the digest in lowercase)",
                "m.yaml:47:17: Volume/nohost spec.source.url: url \"http:///i.img\" names no host",
                "m.yaml:47:17: Volume/nohost spec.source.url: an image URL is never fetched without its digest: sha256 is required (hint: add sha256: <64 hex digits>: the image's SHA256SUMS entry, or `sha256sum` of a copy you verified)",
            ]
        );
    }

    #[test]
    fn formats_per_pool_type() {
        let text = doc(
            "StoragePool",
            "thin",
            &[
                "type: lvmthin",
                "path: /t",
                "lvm: {volumeGroup: vg, thinPool: tp}",
            ],
        ) + &doc(
            "StoragePool",
            "tank",
            &["type: zfs", "path: /z", "zfs: {dataset: tank/vm}"],
        ) + &doc("StoragePool", "b", &["type: btrfs", "path: /b"])
            + &doc(
                "StoragePool",
                "isos",
                &["type: dir", "path: /i", "content: [iso]"],
            )
            + &doc("Volume", "t", &["pool: thin", "size: 1Gi", "format: qcow2"])
            + &doc("Volume", "z", &["pool: tank", "size: 1Gi", "format: qcow2"])
            + &doc("Volume", "bq", &["pool: b", "size: 1Gi", "format: qcow2"])
            + &doc(
                "Volume",
                "iso",
                &["pool: isos", "size: 1Gi", "source: {file: /srv/debian.iso}"],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:39:11: Volume/t spec.format: qcow2 is a file format; pool thin (lvmthin) holds volumes as block devices (hint: use format: raw on lvmthin and zfs pools, or put the volume on a dir or btrfs pool)",
                "m.yaml:47:11: Volume/z spec.format: qcow2 is a file format; pool tank (zfs) holds volumes as block devices (hint: use format: raw on lvmthin and zfs pools, or put the volume on a dir or btrfs pool)",
            ]
        );
    }

    #[test]
    fn clones() {
        let text = doc("StoragePool", "local", &["type: dir", "path: /p"])
            + &doc("StoragePool", "b", &["type: btrfs", "path: /b"])
            + &doc("StoragePool", "thin", &["type: lvmthin", "path: /t", "lvm: {volumeGroup: vg, thinPool: tp}"])
            + &doc("Volume", "tpl", &["pool: local", "size: 2Gi", "format: qcow2", "template: true", "source: {file: /srv/base.qcow2}"])
            + &doc("Volume", "plain", &["pool: local", "size: 2Gi"])
            + &doc("Volume", "web-1", &["pool: local", "size: 2Gi", "format: qcow2", "clone: {from: tpl}"])
            + &doc("Volume", "raw-linked", &["pool: local", "size: 2Gi", "clone: {from: tpl}"])
            + &doc("Volume", "of-plain", &["pool: local", "size: 2Gi", "format: qcow2", "clone: {from: plain, linked: true}"])
            + &doc("Volume", "small", &["pool: local", "size: 1Gi", "format: qcow2", "clone: {from: tpl}", "source: {file: /x.img}"])
            + &doc("Volume", "elsewhere", &["pool: b", "size: 2Gi", "clone: {from: tpl}"])
            + &doc("Volume", "thin-linked", &["pool: thin", "size: 2Gi", "clone: {from: thin-base}"])
            + &doc("Volume", "thin-base", &["pool: thin", "size: 2Gi"])
            + &doc("Volume", "thin-copy", &["pool: thin", "size: 2Gi", "clone: {from: thin-base, linked: false}"])
            // A template that is a clone, and a linked clone of it; a full copy of a clone.
            + &doc("Volume", "tpl2", &["pool: local", "size: 4Gi", "format: qcow2", "template: true", "clone: {from: tpl}"])
            + &doc("Volume", "web-2", &["pool: local", "size: 4Gi", "format: qcow2", "clone: {from: tpl2}"])
            + &doc("Volume", "copy", &["pool: local", "size: 4Gi", "clone: {from: web-2, linked: false}"])
            // btrfs reflinks: any format, any source.
            + &doc("Volume", "b-base", &["pool: b", "size: 2Gi"])
            + &doc("Volume", "b-clone", &["pool: b", "size: 2Gi", "clone: {from: b-base}"])
            + &doc(
                "Volume",
                "b-qcow2",
                &["pool: b", "size: 2Gi", "format: qcow2", "clone: {from: b-base}"],
            )
            + &doc(
                "Volume",
                "b-converted",
                &["pool: b", "size: 2Gi", "format: qcow2", "clone: {from: b-base, linked: false}"],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:56:3: Volume/raw-linked spec.clone: a linked clone on dir pool local is a qcow2 file over its source, so it needs format: qcow2 (hint: set format: qcow2, or clone: {from: tpl, linked: false} for a full copy)",
                "m.yaml:65:17: Volume/of-plain spec.clone.from: Volume/plain is not a template: a linked clone reads its blocks, so nothing may write to it (hint: set template: true on Volume/plain, or linked: false for a full copy)",
                "m.yaml:72:9: Volume/small spec.size: size 1Gi is smaller than Volume/tpl's 2Gi: a clone cannot shrink its source (hint: set size: 2Gi or more)",
                "m.yaml:75:3: Volume/small spec.source: a clone takes its content from Volume/tpl; it has no source (hint: remove source, or remove clone)",
                "m.yaml:83:17: Volume/elsewhere spec.clone.from: Volume/tpl is in pool local, not b: a clone lives in the pool of its source (hint: set pool: local)",
                "m.yaml:91:3: Volume/thin-linked spec.clone: linked clones need a dir pool (qcow2 backing file) or a btrfs pool (reflink); pool thin is lvmthin (hint: use linked: false for a full copy, or a dir or btrfs pool)",
                "m.yaml:156:11: Volume/b-qcow2 spec.format: a linked clone on btrfs pool b is a reflink copy of Volume/b-base, so it has its format (raw) (hint: set format: raw, or linked: false for a converted full copy)",
            ]
        );
    }

    #[test]
    fn a_template_with_clones_cannot_be_deleted() {
        let pool = doc("StoragePool", "local", &["type: dir", "path: /p"]);
        let tpl = |policy: &str| {
            doc(
                "Volume",
                "tpl",
                &[
                    "pool: local",
                    "size: 2Gi",
                    "format: qcow2",
                    "template: true",
                    policy,
                ],
            )
        };
        let clone = |name: &str| {
            doc(
                "Volume",
                name,
                &[
                    "pool: local",
                    "size: 2Gi",
                    "format: qcow2",
                    "clone: {from: tpl}",
                ],
            )
        };
        // The template removed from the manifests while its clones remain.
        let removed = pool.clone() + &clone("web-1") + &clone("web-2");
        assert_eq!(
            diagnostics(&removed),
            [
                "m.yaml:16:17: Volume/web-1 spec.clone.from: Volume/web-1 is a clone of Volume/tpl, which is not defined (a template with clones cannot be deleted)",
                "m.yaml:25:17: Volume/web-2 spec.clone.from: Volume/web-2 is a clone of Volume/tpl, which is not defined (a template with clones cannot be deleted)",
            ]
        );
        // The template set to be deleted with its clones.
        let delete =
            pool.clone() + &tpl("deletionPolicy: Delete") + &clone("web-1") + &clone("web-2");
        assert_eq!(
            diagnostics(&delete),
            [
                "m.yaml:17:19: Volume/tpl spec.deletionPolicy: Volume/tpl is a template with clones (Volume/web-1, Volume/web-2): a template with clones cannot be deleted (hint: use deletionPolicy: Retain, or delete the clones first)",
            ]
        );
        // Without clones, or retained, it is fine.
        assert_eq!(
            diagnostics(&(pool.clone() + &tpl("deletionPolicy: Delete"))),
            Vec::<String>::new()
        );
        assert_eq!(
            diagnostics(&(pool + &tpl("deletionPolicy: Retain") + &clone("web-1"))),
            Vec::<String>::new()
        );
    }
}
