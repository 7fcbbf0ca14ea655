{{/* The release's full name: the release name, with the chart name unless it already holds it. */}}
{{- define "pretrain-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects carry the release namespace too: two releases never collide. */}}
{{- define "pretrain-operator.clusterName" -}}
{{- printf "%s:%s" .Release.Namespace (include "pretrain-operator.fullname" .) -}}
{{- end -}}

{{- define "pretrain-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pretrain-operator.labels" -}}
{{ include "pretrain-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pretrain-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "pretrain-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pretrain-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name the ServiceAccount to run as when serviceAccount.create is false (else the namespace's default ServiceAccount, which every pod there runs as, would be given the operator's rights)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pretrain-operator.leaseName" -}}
{{- default (include "pretrain-operator.fullname" .) .Values.operator.leaseName -}}
{{- end -}}

{{/*
Whether the cluster serves a kind of the Prometheus Operator's API (.kind: ServiceMonitor,
PodMonitor or PrometheusRule): some install only some of its CRDs. A cluster's capabilities list
each kind ("monitoring.coreos.com/v1/PrometheusRule"); `helm template --api-versions
monitoring.coreos.com/v1` without any kind means all of them.
*/}}
{{- define "pretrain-operator.servesMonitoring" -}}
{{- $caps := .root.Capabilities.APIVersions -}}
{{- if $caps.Has (printf "monitoring.coreos.com/v1/%s" .kind) -}}
true
{{- else if and ($caps.Has "monitoring.coreos.com/v1") (not ($caps.Has "monitoring.coreos.com/v1/ServiceMonitor")) (not ($caps.Has "monitoring.coreos.com/v1/PodMonitor")) (not ($caps.Has "monitoring.coreos.com/v1/PrometheusRule")) -}}
true
{{- end -}}
{{- end -}}

{{- /* The chart's own scrapes, rendered (and alerted on) only when enabled and the cluster serves the kind. */}}
{{- define "pretrain-operator.monitorsOperator" -}}
{{- if and .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled (include "pretrain-operator.servesMonitoring" (dict "root" . "kind" "ServiceMonitor")) -}}
true
{{- end -}}
{{- end -}}

{{- define "pretrain-operator.monitorsTrainers" -}}
{{- if and .Values.metrics.podMonitor.enabled (include "pretrain-operator.servesMonitoring" (dict "root" . "kind" "PodMonitor")) -}}
true
{{- end -}}
{{- end -}}

{{- define "pretrain-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "pretrain-operator.metricsService" -}}
{{- printf "%s-metrics" (include "pretrain-operator.fullname" .) -}}
{{- end -}}

{{/*
What the operator does to PretrainJobs and their children, in each namespace it watches
(operator/pretrain_operator/controller.py and handlers.py; tests/test_helm_install.py checks it
with `kubectl auth can-i` as the ServiceAccount).
*/}}
{{- define "pretrain-operator.jobRules" -}}
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs]
  verbs: [get, list, watch, delete]
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs/status]
  verbs: [patch]
{{- /* Children carry a controller ownerReference with blockOwnerDeletion: clusters with the
OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default) refuse their creation
without update on the owner's finalizers. Nothing else is done with it. */}}
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/*
Cluster-scoped reads in either mode: nodes (preemption signals: deleted, NotReady, termination
notices) and CRDs (kopf notices its CRD being re-created). In namespaced mode kopf also lists and
watches namespaces, to start its watches when a listed namespace appears.
*/}}
{{- define "pretrain-operator.clusterRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
# list and watch: kopf's scan (a watcher, which lists first); it never reads one by name.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
# get: whether a job's namespace is being deleted (its pods going is then no preemption);
# list and watch: kopf's namespace scan when watching listed namespaces.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get{{ if .Values.operator.watchNamespaces }}, list, watch{{ end }}]
{{- end -}}
