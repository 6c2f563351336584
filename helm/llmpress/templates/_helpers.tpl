{{/* Names and labels shared by every template. */}}
{{- define "llmpress.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llmpress.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llmpress.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (printf "%s-runner" (include "llmpress.fullname" .)) -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "llmpress.cpuImage" -}}
{{- printf "%s/llmpress-cpu:%s" .Values.images.registry (include "llmpress.tag" .) -}}
{{- end -}}

{{- define "llmpress.cudaImage" -}}
{{- printf "%s/llmpress-cuda:%s" .Values.images.registry (include "llmpress.tag" .) -}}
{{- end -}}

{{- define "llmpress.envConfigMap" -}}
{{- printf "%s-env" (include "llmpress.fullname" .) -}}
{{- end -}}

{{- define "llmpress.recipesConfigMap" -}}
{{- printf "%s-recipes" (include "llmpress.fullname" .) -}}
{{- end -}}

{{- define "llmpress.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "llmpress.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.mlflowUri" -}}
{{- if .Values.mlflow.externalUri -}}
{{- .Values.mlflow.externalUri -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:5000" (include "llmpress.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Pod Security Standards "restricted": what every pod of this chart runs with. */}}
{{- define "llmpress.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llmpress.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The projected token the KFP API accepts (audience-bound, short-lived). */}}
{{- define "llmpress.kfpTokenVolume" -}}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.kubeflow.tokenAudience }}
          expirationSeconds: 3600
{{- end -}}

{{/* The llmpress CLI in a Job: recipes, defaults, KFP connection. */}}
{{- define "llmpress.jobPod" -}}
serviceAccountName: {{ include "llmpress.serviceAccount" .root }}
automountServiceAccountToken: false
restartPolicy: Never
securityContext:
  {{- include "llmpress.podSecurity" .root | nindent 2 }}
{{- with .root.Values.images.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
containers:
  - name: llmpress
    image: {{ include "llmpress.cpuImage" .root }}
    imagePullPolicy: {{ .root.Values.images.pullPolicy }}
    command: [sh, -c]
    args:
      - {{ .script | quote }}
    env:
      - name: KF_PIPELINES_ENDPOINT
        value: {{ .root.Values.kubeflow.host | quote }}
      - name: KF_PIPELINES_SA_TOKEN_PATH
        value: /var/run/secrets/kubeflow/pipelines/token
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "llmpress.containerSecurity" .root | nindent 6 }}
    resources:
      {{- toYaml .root.Values.jobs.resources | nindent 6 }}
    volumeMounts:
      - {name: recipes, mountPath: /etc/llmpress, readOnly: true}
      - {name: kfp-token, mountPath: /var/run/secrets/kubeflow/pipelines, readOnly: true}
      - {name: tmp, mountPath: /tmp}
volumes:
  - name: recipes
    configMap:
      name: {{ include "llmpress.recipesConfigMap" .root }}
  {{- include "llmpress.kfpTokenVolume" .root | nindent 2 }}
  - name: tmp
    emptyDir: {}
{{- end -}}
