//! Ingresses: a new Ingress without a class gets the default
//! IngressClass, as upstream's DefaultIngressClass admission gives it.

use serde_json::{Value, json};

use super::super::Api;
use crate::status::ApiError;

/// The annotation that makes an IngressClass the default one.
const DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

impl Api {
    pub(super) async fn admit_ingress(&self, obj: &mut Value) -> Result<(), ApiError> {
        let unset = obj
            .pointer("/spec/ingressClassName")
            .is_none_or(Value::is_null)
            // The legacy annotation names a class too.
            && obj
                .pointer("/metadata/annotations/kubernetes.io~1ingress.class")
                .is_none();
        if unset
            && let Some(class) = self
                .default_class("networking.k8s.io", "ingressclasses", DEFAULT_CLASS)
                .await?
            && let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("ingressClassName".into(), json!(class));
        }
        Ok(())
    }
}
