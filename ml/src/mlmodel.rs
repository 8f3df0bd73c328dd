//! The trained model as an MLflow Model: the `MLmodel` descriptor (flavors `onnx` and
//! `python_function`, a tensor signature, the environment files), so that MLflow's own tools
//! load and serve a registered Shoal model: `mlflow.pyfunc.load_model`, `mlflow models
//! predict`, `mlflow models serve`.

use serde_json::json;

/// The MLflow Model format this descriptor follows (`mlflow_version` in MLmodel).
pub const MLFLOW_FORMAT: &str = "2.20.0";
/// What the pyfunc flavor needs at run time (pip requirement lines).
pub const REQUIREMENTS: [&str; 3] = ["mlflow>=2.20", "onnxruntime>=1.17", "numpy"];

/// The files of the model folder besides `model.onnx` (a model of `target` from `features`):
/// name and contents.
pub fn files(target: &str, features: &[String], run_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MLmodel", descriptor(target, features, run_id)),
        ("requirements.txt", REQUIREMENTS.join("\n") + "\n"),
        (
            "python_env.yaml",
            "python: \"3\"\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n"
                .into(),
        ),
        (
            "conda.yaml",
            format!(
                "channels:\n- conda-forge\ndependencies:\n- python=3\n- pip\n- pip:\n{}name: mlflow-env\n",
                REQUIREMENTS
                    .iter()
                    .map(|r| format!("  - {r}\n"))
                    .collect::<String>()
            ),
        ),
    ]
}

fn tensor(name: &str, columns: usize) -> serde_json::Value {
    json!({ "type": "tensor", "tensor-spec": { "dtype": "float64", "shape": [-1, columns] }, "name": name })
}

/// The `MLmodel` YAML. Its signature names the ONNX graph's tensors; the features' order is
/// in the `shoal` section and in the ONNX file's metadata.
fn descriptor(target: &str, features: &[String], run_id: &str) -> String {
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.6f");
    let inputs = json!([tensor("features", features.len()), tensor("observed", 1)]);
    let outputs = json!([tensor("expected", 1), tensor("score", 1)]);
    let mut text = format!(
        "artifact_path: model\n\
         flavors:\n\
        \x20 onnx:\n\
        \x20   code: null\n\
        \x20   data: model.onnx\n\
        \x20   providers:\n\
        \x20   - CPUExecutionProvider\n\
        \x20 python_function:\n\
        \x20   data: model.onnx\n\
        \x20   env:\n\
        \x20     conda: conda.yaml\n\
        \x20     virtualenv: python_env.yaml\n\
        \x20   loader_module: mlflow.onnx\n\
        \x20   python_version: '3'\n\
         mlflow_version: {MLFLOW_FORMAT}\n\
         shoal:\n\
        \x20 target: {target}\n\
        \x20 features: [{features}]\n\
         signature:\n\
        \x20 inputs: '{inputs}'\n\
        \x20 outputs: '{outputs}'\n\
        \x20 params: null\n\
         utc_time_created: '{now}'\n",
        features = features.join(", "),
    );
    if !run_id.is_empty() {
        text.push_str(&format!("run_id: {run_id}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_names_the_graphs_tensors() {
        let features = ["cpu_percent".to_string(), "process_count".to_string()];
        let files = files("load1", &features, "abc");
        let mlmodel = &files[0].1;
        assert!(
            mlmodel
                .contains(r#"{"name":"features","tensor-spec":{"dtype":"float64","shape":[-1,2]}"#),
            "{mlmodel}"
        );
        assert!(mlmodel.contains("mlflow_version: "));
        assert!(mlmodel.contains("run_id: abc"));
        assert!(mlmodel.contains("features: [cpu_percent, process_count]"));
        assert!(files.iter().any(|(n, _)| *n == "python_env.yaml"));
    }
}
