//! Pins the wire format of `proto/csi.proto`: every message field and enum
//! value number, checked against `tests/csi-v1.12.0.fields`, a table that
//! was cross-checked against independent sources (see the proto header).
//! A wrong field number is a silent interoperability bug with real CSI
//! clients, so any change to the table must be deliberate.

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

fn walk_enum(prefix: &str, e: &EnumDescriptorProto, out: &mut Vec<String>) {
    for v in &e.value {
        out.push(format!(
            "enum {prefix}{}.{} = {}",
            e.name(),
            v.name(),
            v.number()
        ));
    }
}

fn walk_message(prefix: &str, m: &DescriptorProto, out: &mut Vec<String>) {
    let name = format!("{prefix}{}", m.name());
    if m.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    for f in &m.field {
        let label = if f.label() == prost_types::field_descriptor_proto::Label::Repeated {
            "repeated "
        } else {
            ""
        };
        let ty = match f.type_name() {
            "" => format!("{:?}", f.r#type()).to_lowercase(),
            t => t.trim_start_matches(".csi.v1.").to_string(),
        };
        out.push(format!(
            "field {name}.{} = {} {label}{ty}",
            f.name(),
            f.number()
        ));
    }
    for nested in &m.nested_type {
        walk_message(&format!("{name}."), nested, out);
    }
    for e in &m.enum_type {
        walk_enum(&format!("{name}."), e, out);
    }
}

fn current_table() -> Vec<String> {
    let set =
        FileDescriptorSet::decode(csi_proto::FILE_DESCRIPTOR_SET).expect("descriptor decodes");
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "csi.v1")
        .expect("csi.v1 is in the set");
    let mut out = Vec::new();
    for m in &file.message_type {
        walk_message("", m, &mut out);
    }
    for e in &file.enum_type {
        walk_enum("", e, &mut out);
    }
    for s in &file.service {
        for m in &s.method {
            out.push(format!(
                "rpc {}.{}({}) returns ({}{})",
                s.name(),
                m.name(),
                m.input_type().trim_start_matches(".csi.v1."),
                if m.server_streaming() { "stream " } else { "" },
                m.output_type().trim_start_matches(".csi.v1."),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn csi_proto_wire_format_matches_pinned_v1_12_table() {
    let expected: Vec<String> = include_str!("csi-v1.12.0.fields")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let actual = current_table();
    if std::env::var_os("CSI_FIELDS_PRINT").is_some() {
        println!("{}", actual.join("\n"));
    }
    let missing: Vec<_> = expected.iter().filter(|l| !actual.contains(l)).collect();
    let extra: Vec<_> = actual.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "csi.proto differs from the pinned table\nmissing: {missing:#?}\nunexpected: {extra:#?}"
    );
}

#[test]
fn create_volume_request_encodes_with_spec_tags() {
    use csi_proto::csi::v1::{CapacityRange, CreateVolumeRequest};
    let req = CreateVolumeRequest {
        name: "a".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 4096,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    // field 1 (name, length-delimited) = 0x0a; field 2 (capacity_range) = 0x12;
    // inside it field 1 varint = 0x08, 4096 = 0x80 0x20.
    assert_eq!(
        req.encode_to_vec(),
        vec![0x0a, 0x01, b'a', 0x12, 0x03, 0x08, 0x80, 0x20]
    );
}
