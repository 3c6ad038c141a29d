//! Which kernel modules the guest loads, and in what order: each module's own `depends=`
//! (the `.modinfo` section of its `.ko` file, what `modinfo -F depends` prints) decides, so
//! the VM follows whatever kernel it boots. A list written by hand broke when Debian's 6.1
//! kernel made `virtio.ko` depend on `virtio_ring.ko`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name as `depends=` spells it (`-` read as `_`).
    pub name: String,
    /// Its `.ko` file.
    pub path: PathBuf,
}

/// `wanted` and every module they depend on, found under `modules_dir` (the kernel's
/// `lib/modules/<version>/kernel`), each listed after its dependencies.
pub fn load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let index = index(modules_dir)?;
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        visit(
            &index,
            &normal(name),
            &mut Vec::new(),
            &mut done,
            &mut order,
        )?;
    }
    Ok(order)
}

/// Depth first: a module's dependencies, then the module. `path` is the chain being
/// visited, to name a cycle instead of looping.
fn visit(
    index: &HashMap<String, PathBuf>,
    name: &str,
    path: &mut Vec<String>,
    done: &mut HashSet<String>,
    order: &mut Vec<Module>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if path.iter().any(|p| p == name) {
        bail!(
            "kernel modules depend on each other in a cycle: {} -> {name}",
            path.join(" -> ")
        );
    }
    let file = index.get(name).with_context(|| {
        format!(
            "kernel module {name} (needed by {}) has no .ko file in the kernel package",
            path.last().map_or("the VM", String::as_str)
        )
    })?;
    let elf = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let depends =
        depends(&elf).with_context(|| format!("reading the .modinfo of {}", file.display()))?;
    path.push(name.to_owned());
    for dep in depends {
        visit(index, &dep, path, done, order)?;
    }
    path.pop();
    done.insert(name.to_owned());
    order.push(Module {
        name: name.to_owned(),
        path: file.clone(),
    });
    Ok(())
}

/// Module names as the kernel compares them: `-` and `_` are the same.
fn normal(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` file under `dir`, by module name.
fn index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    found.insert(normal(stem), path.clone());
                } else if name.contains(".ko.") {
                    bail!(
                        "{} is a compressed module; the VM's initramfs loads plain .ko files (busybox insmod)",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(found)
}

/// The modules named by `depends=` in the `.modinfo` section of the 64-bit little-endian ELF
/// object `elf`.
pub fn depends(elf: &[u8]) -> Result<Vec<String>> {
    let info = section(elf, ".modinfo")?.context("no .modinfo section")?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|b| *b == b','))
        .filter(|name| !name.is_empty())
        .map(|name| normal(&String::from_utf8_lossy(name)))
        .collect())
}

/// The contents of the section called `name`, if there is one.
fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a 64-bit little-endian ELF object");
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?)?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    // Offset and size of section `i`'s contents.
    let header = |i: usize| -> Result<(usize, usize)> {
        let at = shoff + i * shentsize;
        Ok((
            usize::try_from(u64_at(elf, at + 0x18)?)?,
            usize::try_from(u64_at(elf, at + 0x20)?)?,
        ))
    };
    let contents = |(offset, size): (usize, usize)| {
        elf.get(offset..offset + size)
            .context("a section lies beyond the end of the file")
    };
    let names = contents(header(shstrndx)?)?;
    for i in 0..shnum {
        let name_at = usize::try_from(u32_at(elf, shoff + i * shentsize)?)?;
        let here = names.get(name_at..).unwrap_or_default();
        let end = here.iter().position(|b| *b == 0).unwrap_or(here.len());
        if &here[..end] == name.as_bytes() {
            return contents(header(i)?).map(Some);
        }
    }
    Ok(None)
}

fn bytes<const N: usize>(elf: &[u8], at: usize) -> Result<[u8; N]> {
    elf.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .context("the ELF headers lie beyond the end of the file")
}

fn u16_at(elf: &[u8], at: usize) -> Result<u16> {
    bytes(elf, at).map(u16::from_le_bytes)
}

fn u32_at(elf: &[u8], at: usize) -> Result<u32> {
    bytes(elf, at).map(u32::from_le_bytes)
}

fn u64_at(elf: &[u8], at: usize) -> Result<u64> {
    bytes(elf, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 object: a null section, `.modinfo` holding `modinfo`, and the section
    /// name table.
    fn elf(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let info_at = out.len();
        out.extend_from_slice(modinfo);
        let names_at = out.len();
        out.extend_from_slice(names);
        let shoff = out.len();
        out[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        for (name, at, size) in [
            (0u32, 0usize, 0usize),
            (1, info_at, modinfo.len()),
            (10, names_at, names.len()),
        ] {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            out.extend_from_slice(&h);
        }
        out
    }

    #[test]
    fn depends_are_read_from_the_modinfo_section() {
        let o = elf(b"license=GPL\0depends=virtio_ring,virtio-pci-modern-dev\0vermagic=6.1\0");
        assert_eq!(
            depends(&o).unwrap(),
            ["virtio_ring", "virtio_pci_modern_dev"]
        );
        assert!(
            depends(&elf(b"license=GPL\0depends=\0"))
                .unwrap()
                .is_empty()
        );
        assert!(depends(b"not an elf").is_err());
        let mut cut = o;
        cut.truncate(100);
        assert!(depends(&cut).is_err());
    }

    #[test]
    fn each_module_comes_after_what_it_depends_on() {
        let dir = tempfile::tempdir().unwrap();
        let ko = |rel: &str, deps: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, elf(format!("depends={deps}\0").as_bytes())).unwrap();
        };
        // Debian 12's 6.1.192: virtio depends on virtio_ring.
        ko("drivers/virtio/virtio.ko", "virtio_ring");
        ko("drivers/virtio/virtio_ring.ko", "");
        ko("drivers/virtio/virtio_pci_modern_dev.ko", "");
        ko(
            "drivers/virtio/virtio_pci.ko",
            "virtio_pci_modern_dev,virtio,virtio_ring",
        );
        ko("drivers/block/virtio_blk.ko", "virtio,virtio_ring");
        let order: Vec<String> = load_order(dir.path(), &["virtio_pci", "virtio_blk"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            order,
            [
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        ko("drivers/block/loop.ko", "nowhere");
        let err = load_order(dir.path(), &["loop"]).unwrap_err().to_string();
        assert!(err.contains("nowhere"), "{err}");
        ko("a.ko", "b");
        ko("b.ko", "a");
        let err = load_order(dir.path(), &["a"]).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }
}
