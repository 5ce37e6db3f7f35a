//! `-o help` / `-o ?`: the creation options of a format, laid out and worded as
//! qemu-img prints them, listing only the options imgconv's writers take.

use imgconv::Format;

/// (name, type, description) of each option a format's writer takes, sorted by name.
fn options(format: Format) -> &'static [(&'static str, &'static str, &'static str)] {
    const BACKING_FILE: (&str, &str, &str) = ("backing_file", "str", "File name of a base image");
    const SIZE: (&str, &str, &str) = ("size", "size", "Virtual disk size");
    match format {
        Format::Raw => &[
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            SIZE,
        ],
        Format::Qcow2 => &[
            BACKING_FILE,
            ("backing_fmt", "str", "Image format of the base image"),
            ("cluster_size", "size", "qcow2 cluster size"),
            ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
            (
                "compression_type",
                "str",
                "Compression method used for image cluster compression",
            ),
            ("extended_l2", "bool (on/off)", "Extended L2 tables"),
            ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            ("refcount_bits", "num", "Width of a reference count entry in bits"),
            SIZE,
        ],
        Format::Vmdk => &[
            ("adapter_type", "str", "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
            BACKING_FILE,
            ("backing_fmt", "str", "Must be 'vmdk' if present"),
            ("compat6", "bool (on/off)", "VMDK version 6 image"),
            ("hwversion", "str", "VMDK hardware version"),
            SIZE,
            ("subformat", "str", "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
            ("toolsversion", "str", "VMware guest tools version"),
            ("zeroed_grain", "bool (on/off)", "Enable efficient zero writes using the zeroed-grain GTE feature"),
        ],
        Format::Vdi => &[
            (
                "cluster_size",
                "size",
                "VDI block size (imgconv; power of two, default 1M)",
            ),
            SIZE,
            ("static", "bool (on/off)", "VDI static (pre-allocated) image"),
            ("uuid", "str", "VDI image UUID (imgconv; default: a fresh one)"),
        ],
        Format::Vpc => &[
            (
                "azure",
                "str",
                "imgconv: on = a fixed VHD of the exact size, as Azure takes it (whole MiB); round = the size rounded up to a whole MiB",
            ),
            ("force_size", "bool (on/off)", "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation"),
            SIZE,
            ("subformat", "str", "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
        ],
        Format::Vhdx => &[
            ("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
            ("block_state_zero", "bool (on/off)", "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
            ("log_size", "size", "Log size; min 1MB."),
            ("logical_sector_size", "size", "imgconv: logical sector size, 512 or 4096 (default 512)"),
            ("size", "size", "Virtual disk size; max of 64TB."),
            ("subformat", "str", "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
        ],
        _ => &[SIZE],
    }
}

/// The help text: with a target file name qemu merges the file protocol's options in
/// and leaves out the note about them.
pub fn text(format: Format, filename: Option<&str>) -> String {
    let mut s = if filename.is_some() {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {format} options:\n")
    };
    for (name, ty, desc) in options(format) {
        let mut line = format!("  {name}=<{ty}>");
        while line.len() < 24 {
            line.push(' ');
        }
        s += &format!("{line} - {desc}\n");
    }
    if filename.is_none() {
        s += "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n";
    }
    s
}

/// True when a `-o` list asks for help (`help` or `?` among its items), as qemu checks.
pub fn asks_for_help(options: &[String]) -> bool {
    options.iter().any(|o| {
        crate::spec::parse_option_string(o, None)
            .map(|m| m.contains_key("help") || m.contains_key("?"))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laid_out_as_qemu() {
        let t = text(Format::Qcow2, None);
        assert!(t.starts_with(
            "Supported qcow2 options:\n  backing_file=<str>     - File name of a base image\n"
        ));
        assert!(t.contains("\n  size=<size>            - Virtual disk size\n"));
        assert!(t.contains("\n  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"));
        assert!(t.ends_with("Specify the target filename to include those options.\n"));
        assert!(
            text(Format::Raw, Some("x")).starts_with("Supported options:\n  preallocation=<str>")
        );
        assert!(asks_for_help(&["cluster_size=65536,help".into()]));
        assert!(asks_for_help(&["?".into()]));
        assert!(!asks_for_help(&["compat=1.1".into()]));
    }
}
