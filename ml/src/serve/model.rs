//! One loaded model: its ONNX graph optimised by tract, its inputs' and outputs' names,
//! datatypes and shapes, and inference over V2 tensors with every input checked first (name,
//! datatype, shape, element count, NaN), so that a bad request gets a clear error and never
//! reaches the runtime.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

/// A tensor's description: name, V2 datatype, shape (-1 for any size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// Tensor elements, flattened in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Bool(Vec<bool>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Fp32(v) => v.len(),
            Data::Fp64(v) => v.len(),
            Data::Int32(v) => v.len(),
            Data::Int64(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The V2 datatype name.
    pub fn datatype(&self) -> &'static str {
        match self {
            Data::Fp32(_) => "FP32",
            Data::Fp64(_) => "FP64",
            Data::Int32(_) => "INT32",
            Data::Int64(_) => "INT64",
            Data::Bool(_) => "BOOL",
        }
    }

    /// Elements from little-endian bytes (the protocol's raw and binary forms).
    pub fn from_le_bytes(datatype: &str, raw: &[u8]) -> Result<Self, String> {
        fn chunks<const N: usize, T>(
            raw: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>, String> {
            if !raw.len().is_multiple_of(N) {
                return Err(format!(
                    "{} bytes are not a whole number of {N}-byte elements",
                    raw.len()
                ));
            }
            Ok(raw
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("exact chunk")))
                .collect())
        }
        Ok(match datatype {
            "FP32" => Data::Fp32(chunks(raw, f32::from_le_bytes)?),
            "FP64" => Data::Fp64(chunks(raw, f64::from_le_bytes)?),
            "INT32" => Data::Int32(chunks(raw, i32::from_le_bytes)?),
            "INT64" => Data::Int64(chunks(raw, i64::from_le_bytes)?),
            "BOOL" => Data::Bool(raw.iter().map(|b| *b != 0).collect()),
            other => return Err(unsupported(other)),
        })
    }

    /// The elements as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Data::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Fp64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Int32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
        }
    }

    /// `parts` one after another (all of this datatype).
    pub(crate) fn concat<'a>(parts: impl Iterator<Item = &'a Data>) -> Data {
        let mut parts = parts.peekable();
        let mut out = match parts.peek() {
            Some(Data::Fp32(_)) => Data::Fp32(Vec::new()),
            Some(Data::Fp64(_)) => Data::Fp64(Vec::new()),
            Some(Data::Int32(_)) => Data::Int32(Vec::new()),
            Some(Data::Int64(_)) => Data::Int64(Vec::new()),
            Some(Data::Bool(_)) | None => Data::Bool(Vec::new()),
        };
        for p in parts {
            match (&mut out, p) {
                (Data::Fp32(o), Data::Fp32(v)) => o.extend_from_slice(v),
                (Data::Fp64(o), Data::Fp64(v)) => o.extend_from_slice(v),
                (Data::Int32(o), Data::Int32(v)) => o.extend_from_slice(v),
                (Data::Int64(o), Data::Int64(v)) => o.extend_from_slice(v),
                (Data::Bool(o), Data::Bool(v)) => o.extend_from_slice(v),
                _ => unreachable!("stacked tensors share a datatype"),
            }
        }
        out
    }

    /// Elements `range`.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Data {
        match self {
            Data::Fp32(v) => Data::Fp32(v[range].to_vec()),
            Data::Fp64(v) => Data::Fp64(v[range].to_vec()),
            Data::Int32(v) => Data::Int32(v[range].to_vec()),
            Data::Int64(v) => Data::Int64(v[range].to_vec()),
            Data::Bool(v) => Data::Bool(v[range].to_vec()),
        }
    }

    fn has_nan(&self) -> bool {
        match self {
            Data::Fp32(v) => v.iter().any(|x| !x.is_finite()),
            Data::Fp64(v) => v.iter().any(|x| !x.is_finite()),
            _ => false,
        }
    }
}

/// A named tensor, as a V2 request or response carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot load {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("{0}")]
    BadInput(String),
    #[error("inference failed: {0}")]
    Runtime(String),
}

/// A model ready to run.
#[derive(Clone)]
pub struct LoadedModel {
    plan: Arc<TypedRunnableModel>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The ONNX file's metadata properties (a Shoal model's features, target, dataset…).
    pub metadata: std::collections::BTreeMap<String, String>,
    pub(crate) batcher: Arc<super::batch::Batcher>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

fn v2_datatype(t: DatumType) -> Option<&'static str> {
    Some(match t {
        DatumType::F32 => "FP32",
        DatumType::F64 => "FP64",
        DatumType::I32 => "INT32",
        DatumType::I64 => "INT64",
        DatumType::Bool => "BOOL",
        _ => return None,
    })
}

fn spec(model: &TypedModel, outlet: OutletId) -> Result<TensorSpec, String> {
    let fact = model.outlet_fact(outlet).map_err(|e| e.to_string())?;
    let datatype = v2_datatype(fact.datum_type)
        .ok_or_else(|| format!("tensor type {:?} is not served", fact.datum_type))?;
    let name = model
        .outlet_label(outlet)
        .unwrap_or(&model.node(outlet.node).name)
        .to_string();
    let shape = fact
        .shape
        .iter()
        .map(|d| d.to_i64().unwrap_or(-1))
        .collect();
    Ok(TensorSpec {
        name,
        datatype: datatype.into(),
        shape,
    })
}

impl LoadedModel {
    /// Loads and optimises the ONNX model at `path`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|reason| ModelError::Load {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Loads an ONNX model from its bytes.
    pub fn from_bytes(onnx: &[u8]) -> Result<Self, String> {
        let typed = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(onnx))
            .and_then(|m| m.into_optimized())
            .map_err(|e| format!("not a model this runtime can run: {e:#}"))?;
        let inputs = typed
            .input_outlets()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|o| spec(&typed, *o))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = typed
            .output_outlets()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|o| spec(&typed, *o))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = typed.into_runnable().map_err(|e| e.to_string())?;
        Ok(Self {
            plan,
            inputs,
            outputs,
            metadata: crate::onnx::metadata(onnx),
            batcher: Arc::default(),
        })
    }

    /// Runs the model on `inputs` (each named once, in any order), after checking each against
    /// its spec; returns every output.
    pub fn infer(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, ModelError> {
        let ordered = self.validate(inputs)?;
        self.run(ordered.iter().map(|t| to_tensor(t).into()).collect())
    }

    /// `inputs` in the model's input order, each checked against its spec.
    pub(crate) fn validate(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, ModelError> {
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let given = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| ModelError::BadInput(format!("input {:?} is missing", spec.name)))?;
            check(spec, given)?;
            ordered.push(given.clone());
        }
        if let Some(extra) = inputs
            .iter()
            .find(|t| !self.inputs.iter().any(|s| s.name == t.name))
        {
            return Err(ModelError::BadInput(format!(
                "the model has no input {:?} (its inputs: {})",
                extra.name,
                names(&self.inputs)
            )));
        }
        Ok(ordered)
    }

    /// What this model has run so far.
    pub fn counters(&self) -> super::batch::Counters {
        self.batcher.counters()
    }

    /// Whether requests can be stacked along their first dimension: every input and output
    /// takes any number of rows.
    pub(crate) fn batchable(&self) -> bool {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .all(|s| s.shape.first() == Some(&-1))
    }

    /// Runs checked inputs (in input order).
    pub(crate) fn run(&self, inputs: TVec<TValue>) -> Result<Vec<NamedTensor>, ModelError> {
        let outputs = self
            .plan
            .run(inputs)
            .map_err(|e| ModelError::Runtime(format!("{e:#}")))?;
        self.outputs
            .iter()
            .zip(outputs)
            .map(|(spec, value)| to_named(spec, &value))
            .collect()
    }
}

/// The error for a datatype this server does not take.
pub fn unsupported(datatype: &str) -> String {
    format!("datatype {datatype:?} is not served (FP32, FP64, INT32, INT64, BOOL)")
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `given` fits `spec`: datatype, shape, element count, finite values.
fn check(spec: &TensorSpec, given: &NamedTensor) -> Result<(), ModelError> {
    let bad = |m: String| Err(ModelError::BadInput(format!("input {:?}: {m}", spec.name)));
    if given.data.datatype() != spec.datatype {
        return bad(format!(
            "datatype {} where the model takes {}",
            given.data.datatype(),
            spec.datatype
        ));
    }
    let fits = given.shape.len() == spec.shape.len()
        && given
            .shape
            .iter()
            .zip(&spec.shape)
            .all(|(g, s)| *g >= 0 && (*s < 0 || g == s));
    if !fits {
        return bad(format!(
            "shape {:?} where the model takes {:?} (-1: any size)",
            given.shape, spec.shape
        ));
    }
    let count: i64 = given.shape.iter().product();
    if usize::try_from(count).ok() != Some(given.data.len()) {
        return bad(format!(
            "shape {:?} holds {count} elements, {} were sent",
            given.shape,
            given.data.len()
        ));
    }
    if given.data.has_nan() {
        return bad("NaN or infinite values".into());
    }
    Ok(())
}

/// The runtime's tensor for a checked one.
pub(crate) fn to_tensor(given: &NamedTensor) -> Tensor {
    let shape: Vec<usize> = given.shape.iter().map(|d| *d as usize).collect();
    let tensor = match &given.data {
        Data::Fp32(v) => Tensor::from_shape(&shape, v),
        Data::Fp64(v) => Tensor::from_shape(&shape, v),
        Data::Int32(v) => Tensor::from_shape(&shape, v),
        Data::Int64(v) => Tensor::from_shape(&shape, v),
        Data::Bool(v) => Tensor::from_shape(&shape, v),
    };
    tensor.expect("a checked tensor's shape holds its elements")
}

fn to_named(spec: &TensorSpec, value: &TValue) -> Result<NamedTensor, ModelError> {
    let runtime = |e: TractError| ModelError::Runtime(format!("{e:#}"));
    let data = match value.datum_type() {
        DatumType::F32 => Data::Fp32(
            value
                .to_plain_array_view::<f32>()
                .map_err(runtime)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::F64 => Data::Fp64(
            value
                .to_plain_array_view::<f64>()
                .map_err(runtime)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I32 => Data::Int32(
            value
                .to_plain_array_view::<i32>()
                .map_err(runtime)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I64 => Data::Int64(
            value
                .to_plain_array_view::<i64>()
                .map_err(runtime)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::Bool => Data::Bool(
            value
                .to_plain_array_view::<bool>()
                .map_err(runtime)?
                .iter()
                .copied()
                .collect(),
        ),
        other => {
            return Err(ModelError::Runtime(format!(
                "output {:?} has type {other:?}, which is not served",
                spec.name
            )));
        }
    };
    Ok(NamedTensor {
        name: spec.name.clone(),
        shape: value.shape().iter().map(|d| *d as i64).collect(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Model;

    fn model() -> Model {
        Model {
            target: "temperature_celsius".into(),
            features: vec!["load1".into(), "cpu_percent".into()],
            weights: vec![2.5, 0.125],
            intercept: 41.0,
            sigma: 1.5,
            threshold: 4.0,
        }
    }

    fn loaded() -> LoadedModel {
        LoadedModel::from_bytes(&crate::onnx::export(&model(), &[])).unwrap()
    }

    fn f64s(name: &str, shape: &[i64], v: &[f64]) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data: Data::Fp64(v.to_vec()),
        }
    }

    #[test]
    fn the_exported_model_runs_and_agrees_with_the_trained_one() {
        let m = loaded();
        assert_eq!(
            m.inputs,
            vec![
                TensorSpec {
                    name: "features".into(),
                    datatype: "FP64".into(),
                    shape: vec![-1, 2]
                },
                TensorSpec {
                    name: "observed".into(),
                    datatype: "FP64".into(),
                    shape: vec![-1, 1]
                },
            ]
        );
        let rows = [[0.5, 20.0], [3.0, 90.0], [0.0, 0.0]];
        let observed = [45.0, 60.0, 41.0];
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        let out = m
            .infer(&[
                f64s("observed", &[3, 1], &observed),
                f64s("features", &[3, 2], &flat),
            ])
            .unwrap();
        let names: Vec<_> = out.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["expected", "score"]);
        let (Data::Fp64(expected), Data::Fp64(score)) = (&out[0].data, &out[1].data) else {
            panic!("{out:?}")
        };
        assert_eq!(out[1].shape, vec![3, 1]);
        let reference = model();
        for (i, row) in rows.iter().enumerate() {
            assert!((expected[i] - reference.expected(row)).abs() < 1e-9);
            assert!((score[i] - reference.score(row, observed[i])).abs() < 1e-9);
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason_and_the_model_keeps_working() {
        let m = loaded();
        let good = || {
            vec![
                f64s("features", &[1, 2], &[1.0, 2.0]),
                f64s("observed", &[1, 1], &[3.0]),
            ]
        };
        let refused = |inputs: Vec<NamedTensor>| m.infer(&inputs).unwrap_err().to_string();
        let mut wrong_name = good();
        wrong_name[1].name = "observd".into();
        assert!(refused(wrong_name).contains("\"observed\" is missing"));
        let mut extra = good();
        extra.push(f64s("bogus", &[1], &[1.0]));
        assert!(refused(extra).contains("no input \"bogus\""));
        let mut shape = good();
        shape[0] = f64s("features", &[1, 3], &[1.0, 2.0, 3.0]);
        assert!(refused(shape).contains("shape [1, 3]"));
        let mut count = good();
        count[0].shape = vec![2, 2];
        assert!(refused(count).contains("4 elements, 2 were sent"));
        let mut dtype = good();
        dtype[1].data = Data::Fp32(vec![3.0]);
        assert!(refused(dtype).contains("datatype FP32"));
        let mut nan = good();
        nan[0].data = Data::Fp64(vec![f64::NAN, 1.0]);
        assert!(refused(nan).contains("NaN"));
        let mut negative = good();
        negative[0].shape = vec![-1, 2];
        assert!(refused(negative).contains("shape"));
        assert!(m.infer(&good()).is_ok(), "still serving");
        assert!(
            LoadedModel::from_bytes(b"not onnx")
                .unwrap_err()
                .contains("not a model")
        );
    }
}
