// Validate Argo custom resources against their CRDs' schemas, offline: the schemas ship in
// the npm packages @kubernetes-models/argo-rollouts and @kubernetes-models/argo-cd
// (package.json devDependencies, installed by `make assets`). tests/test_rollout.py runs it.
//
// stdin: a JSON list of resources; stdout: a JSON list, per resource null (valid) or the
// validator's message. These schemas check types, enums and required fields; like the API
// server they ignore unknown fields, which the structural tests cover.
import { AnalysisTemplate } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/AnalysisTemplate";
import { Rollout } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/Rollout";
import { Application } from "@kubernetes-models/argo-cd/argoproj.io/v1alpha1/Application";

const MODELS = {
  "argoproj.io/v1alpha1 AnalysisTemplate": AnalysisTemplate,
  "argoproj.io/v1alpha1 Application": Application,
  "argoproj.io/v1alpha1 Rollout": Rollout,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((resource) => {
  const Model = MODELS[`${resource.apiVersion} ${resource.kind}`];
  if (!Model) return `no schema for ${resource.apiVersion} ${resource.kind}`;
  try {
    new Model(resource).validate();
    return null;
  } catch (error) {
    return String(error.message);
  }
});
process.stdout.write(JSON.stringify(results));
