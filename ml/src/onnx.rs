//! The trained model as ONNX (IR 8, opset 17, standard operators only), so any ONNX runtime
//! serves it:
//!
//! ```text
//! inputs   features  double[N, K]   the model's features, in `Model::features` order (missing: 0)
//!          observed  double[N, 1]   the observed target (temperature)
//! outputs  expected  double[N, 1]   features · W + B
//!          score     double[N, 1]   |observed − expected| / sigma
//! ```
//!
//! Doubles throughout, so a runtime reproduces shoal-ml's own arithmetic to ~1e-12.

use prost::Message;

use crate::train::Model;

/// The generated ONNX protobuf types (the subset in `ml/proto/onnx/onnx-subset.proto`).
#[allow(clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::tensor_shape_proto::{Dimension, dimension::Value as Dim};
use proto::type_proto::{Tensor, Value as TypeValue};
use proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// ONNX's code for double tensors.
const DOUBLE: i32 = 11;
pub const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;

fn value_info(name: &str, dims: &[Option<i64>], doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        doc_string: Some(doc.into()),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(Tensor {
                elem_type: Some(DOUBLE),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Some(n) => Dim::DimValue(*n),
                                None => Dim::DimParam("N".into()),
                            }),
                        })
                        .collect(),
                }),
            })),
        }),
    }
}

fn constant(name: &str, dims: &[i64], values: Vec<f64>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DOUBLE),
        double_data: values,
        ..TensorProto::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(output.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..NodeProto::default()
    }
}

/// Encodes `model` as an ONNX file; `metadata` goes into the model's metadata properties
/// (dataset digest, run id…).
pub fn export(model: &Model, metadata: &[(&str, &str)]) -> Vec<u8> {
    let k = model.features.len() as i64;
    let graph = GraphProto {
        name: Some("shoal_anomaly".into()),
        doc_string: Some(format!(
            "expected {} from [{}]; score = |observed - expected| / {}",
            model.target,
            model.features.join(", "),
            model.sigma
        )),
        node: vec![
            node("MatMul", &["features", "W"], "linear"),
            node("Add", &["linear", "B"], "expected"),
            node("Sub", &["observed", "expected"], "residual"),
            node("Abs", &["residual"], "abs_residual"),
            node("Mul", &["abs_residual", "inv_sigma"], "score"),
        ],
        initializer: vec![
            constant("W", &[k, 1], model.weights.clone()),
            constant("B", &[1], vec![model.intercept]),
            constant("inv_sigma", &[1], vec![1.0 / model.sigma]),
        ],
        input: vec![
            value_info(
                "features",
                &[None, Some(k)],
                &format!("[{}]", model.features.join(", ")),
            ),
            value_info("observed", &[None, Some(1)], &model.target),
        ],
        output: vec![
            value_info("expected", &[None, Some(1)], &model.target),
            value_info("score", &[None, Some(1)], "anomaly score"),
        ],
    };
    let mut props: Vec<StringStringEntryProto> = vec![
        entry("features", &model.features.join(",")),
        entry("target", &model.target),
        entry("sigma", &model.sigma.to_string()),
        entry("threshold", &model.threshold.to_string()),
    ];
    props.extend(metadata.iter().map(|(k, v)| entry(k, v)));
    ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("shoal-ml".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        domain: Some("dev.shoal".into()),
        model_version: Some(1),
        doc_string: Some("Shoal device-health anomaly detector".into()),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        metadata_props: props,
    }
    .encode_to_vec()
}

/// The metadata properties of an ONNX file (empty when it does not decode).
pub fn metadata(onnx: &[u8]) -> std::collections::BTreeMap<String, String> {
    ModelProto::decode(onnx)
        .map(|m| {
            m.metadata_props
                .into_iter()
                .filter_map(|p| Some((p.key?, p.value.unwrap_or_default())))
                .collect()
        })
        .unwrap_or_default()
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_carries_the_weights() {
        let model = Model {
            target: "temperature_celsius".into(),
            features: vec!["cpu_percent".into(), "load1".into()],
            weights: vec![0.25, 2.0],
            intercept: 40.0,
            sigma: 0.5,
            threshold: 3.0,
        };
        let bytes = export(&model, &[("dataset_sha256", "abc")]);
        let back = ModelProto::decode(bytes.as_slice()).unwrap();
        let g = back.graph.unwrap();
        assert_eq!(g.initializer[0].double_data, vec![0.25, 2.0]);
        assert_eq!(g.initializer[0].dims, vec![2, 1]);
        assert_eq!(g.node.len(), 5);
        let meta = metadata(&bytes);
        assert_eq!(meta["dataset_sha256"], "abc");
        assert_eq!(meta["features"], "cpu_percent,load1");
        assert_eq!(meta["target"], "temperature_celsius");
    }
}
