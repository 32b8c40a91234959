// Shows the answer of "Ovis-U1 Understand" on the node: it returns ui.PreviewText ({"text": [answer]}), which
// ComfyUI's frontend (1.42 with 0.18.1, 1.49 with 0.33.0) draws only on its own PreviewAny node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "OvisU1Understand";
const WIDGET = "answer_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.options ??= {};
    widget.options.serialize = false; // never sent to the server
    widget.serialize = false; // nor saved in the workflow
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
      widget.inputEl.placeholder = "answer";
    }
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
    node.setDirtyCanvas?.(true, true);
  });
}

app.registerExtension({
  name: "OvisU1.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text !== undefined) showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
